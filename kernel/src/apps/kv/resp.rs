//! RESP2: the request parser (multibulk and inline requests) and the reply writers.
//!
//! The parser is incremental and keeps its state per connection ([`Parser`]): bulk data is
//! copied out of the input as it arrives, so a caller's buffer only ever holds an unfinished
//! header or inline line (at most [`MAX_INLINE_BYTES`]) — never a whole large request. Lengths
//! announced by a client are checked against the caps below before anything is reserved, and
//! nothing is reserved beyond the bytes actually received.
//!
//! Parsing follows Redis 7's `processMultibulkBuffer`/`processInlineBuffer`, including its
//! leniencies (the two bytes after a header's `\r` and after bulk data are skipped unchecked;
//! `*0` and `*-1` are empty requests) and its error texts.

use alloc::vec::Vec;
use core::fmt;

/// Longest bulk string (one argument: key or value) a client may send, in bytes: 512 MiB,
/// Redis's default `proto-max-bulk-len`. A longer `$len` is a protocol error ("invalid bulk
/// length", as Redis answers) and closes the connection. APPEND cannot grow a value past it
/// either.
pub const MAX_BULK_BYTES: usize = 512 << 20;

/// Most arguments in one multibulk request: 1 Mi. A larger `*count` is a protocol error
/// ("invalid multibulk length").
pub const MAX_MULTIBULK_ARGS: usize = 1 << 20;

/// Longest inline request line, and longest `*count`/`$len` header line, in bytes: 64 KiB
/// (Redis's `PROTO_INLINE_MAX_SIZE`). A longer line — finished or not — is a protocol error
/// ("too big inline request", "too big mbulk count string", "too big bulk count string").
/// This is also the most a caller ever has to keep unconsumed between calls.
pub const MAX_INLINE_BYTES: usize = 64 << 10;

/// Most bytes one request may hold once parsed: 1 GiB (Redis's `client-query-buffer-limit`),
/// counting every argument's length plus [`ARG_OVERHEAD`] per argument. A request announcing
/// more is a protocol error ("too big request"). Bounds the memory one connection can pin;
/// within it, a request whose memory the VM cannot get is read to its end and answered with
/// Redis's OOM error (see [`Parser::out_of_memory`]), the connection staying open.
pub const MAX_REQUEST_BYTES: usize = 1 << 30;

/// What each argument is charged against [`MAX_REQUEST_BYTES`] beyond its length (its vector
/// header and allocator slack).
pub const ARG_OVERHEAD: usize = 32;

/// A malformed request. Every one of them ends the connection (after the reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolError {
    /// An inline line longer than [`MAX_INLINE_BYTES`].
    TooBigInline,
    /// An inline line with an unterminated quote, or a closing quote not followed by a space.
    UnbalancedQuotes,
    /// A `*count` line longer than [`MAX_INLINE_BYTES`].
    TooBigMultibulkCount,
    /// A `*count` that is not an integer or exceeds [`MAX_MULTIBULK_ARGS`].
    InvalidMultibulkLength,
    /// An argument that does not start with `$`; holds the byte found instead.
    ExpectedDollar(u8),
    /// A `$len` line longer than [`MAX_INLINE_BYTES`].
    TooBigBulkCount,
    /// A `$len` that is not an integer, is negative or exceeds [`MAX_BULK_BYTES`].
    InvalidBulkLength,
    /// A request whose arguments would exceed [`MAX_REQUEST_BYTES`].
    TooBigRequest,
}

impl ProtocolError {
    /// Appends the error reply, byte-for-byte as Redis 7 words it.
    pub fn reply(&self, out: &mut Vec<u8>) {
        let text: &[u8] = match self {
            Self::TooBigInline => b"too big inline request",
            Self::UnbalancedQuotes => b"unbalanced quotes in request",
            Self::TooBigMultibulkCount => b"too big mbulk count string",
            Self::InvalidMultibulkLength => b"invalid multibulk length",
            Self::ExpectedDollar(got) => {
                let mut msg = Vec::with_capacity(40);
                msg.extend_from_slice(b"ERR Protocol error: expected '$', got '");
                msg.push(*got);
                msg.push(b'\'');
                error(out, &msg);
                return;
            }
            Self::TooBigBulkCount => b"too big bulk count string",
            Self::InvalidBulkLength => b"invalid bulk length",
            Self::TooBigRequest => b"too big request",
        };
        let mut msg = Vec::with_capacity(20 + text.len());
        msg.extend_from_slice(b"ERR Protocol error: ");
        msg.extend_from_slice(text);
        error(out, &msg);
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut reply = Vec::new();
        self.reply(&mut reply);
        let text = reply.get(1..reply.len().saturating_sub(2)).unwrap_or(&[]);
        for &b in text {
            if b.is_ascii_graphic() || b == b' ' {
                write!(f, "{}", b as char)?;
            } else {
                write!(f, "{}", core::ascii::escape_default(b))?;
            }
        }
        Ok(())
    }
}

/// Where the parser is within the current request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between requests.
    Start,
    /// Expecting the `$len` line of the next argument; `left` arguments remain (`left > 0`).
    Header { left: usize },
    /// Reading an argument's data: `need` bytes of data, then `trailer` bytes of `\r\n`, then
    /// `left` more arguments.
    Bulk { need: usize, trailer: usize, left: usize },
}

/// The incremental request parser of one connection.
#[derive(Debug)]
pub struct Parser {
    state: State,
    args: Vec<Vec<u8>>,
    /// Bytes charged to the request being parsed (see [`MAX_REQUEST_BYTES`]).
    charged: usize,
    /// The memory for the request being parsed could not be had: the rest of it is read and
    /// dropped, and it is answered with an OOM error instead of being run.
    oom: bool,
}

/// Argument vectors longer than this are not kept for the next request.
const KEEP_ARGS: usize = 64;

impl Default for Parser {
    fn default() -> Self {
        Self::new()
    }
}

impl Parser {
    /// A parser between requests.
    pub const fn new() -> Self {
        Self { state: State::Start, args: Vec::new(), charged: 0, oom: false }
    }

    /// Parses from `input[*pos..]`, advancing `*pos` over every byte it took in. Returns
    /// `Ok(true)` when a whole request is ready in [`Parser::args`] (the caller runs it, then
    /// calls [`Parser::finish`]); `Ok(false)` when more input is needed — then everything up
    /// to `*pos` has been absorbed and `input[*pos..]` is an unfinished line (at most
    /// [`MAX_INLINE_BYTES`]) to present again with more bytes after it.
    pub fn parse(&mut self, input: &[u8], pos: &mut usize) -> Result<bool, ProtocolError> {
        loop {
            let Some(rest) = input.get(*pos..) else { return Ok(false) };
            if rest.is_empty() {
                return Ok(false);
            }
            match self.state {
                State::Start => {
                    if rest.first() == Some(&b'*') {
                        let Some((line, used)) = header_line(rest, ProtocolError::TooBigMultibulkCount)? else {
                            return Ok(false);
                        };
                        let count = parse_i64(line.get(1..).unwrap_or(&[]))
                            .filter(|&n| n <= MAX_MULTIBULK_ARGS as i64)
                            .ok_or(ProtocolError::InvalidMultibulkLength)?;
                        *pos += used;
                        if count > 0 {
                            self.state = State::Header { left: count as usize };
                            if self.args.try_reserve(count.min(16) as usize).is_err() {
                                self.drop_request();
                            }
                        }
                    } else {
                        // As Redis (`strchr` on a C string), a NUL hides the line end: the
                        // line stays unfinished until the input passes the inline cap.
                        let Some(nl) = memchr(b'\n', rest).filter(|&nl| memchr(0, &rest[..nl]).is_none()) else {
                            if rest.len() > MAX_INLINE_BYTES {
                                return Err(ProtocolError::TooBigInline);
                            }
                            return Ok(false);
                        };
                        if nl > MAX_INLINE_BYTES {
                            return Err(ProtocolError::TooBigInline);
                        }
                        let line = rest.get(..nl).unwrap_or(&[]);
                        let line = line.strip_suffix(b"\r").unwrap_or(line);
                        split_inline(line, &mut self.args)?;
                        *pos += nl + 1;
                        if !self.args.is_empty() {
                            return Ok(true);
                        }
                    }
                }
                State::Header { left } => {
                    let first = rest.first().copied().unwrap_or(0);
                    if first != b'$' {
                        return Err(ProtocolError::ExpectedDollar(first));
                    }
                    let Some((line, used)) = header_line(rest, ProtocolError::TooBigBulkCount)? else {
                        return Ok(false);
                    };
                    let len = parse_i64(line.get(1..).unwrap_or(&[]))
                        .filter(|&n| (0..=MAX_BULK_BYTES as i64).contains(&n))
                        .ok_or(ProtocolError::InvalidBulkLength)? as usize;
                    let charged = self.charged + len + ARG_OVERHEAD;
                    if charged > MAX_REQUEST_BYTES {
                        return Err(ProtocolError::TooBigRequest);
                    }
                    self.charged = charged;
                    *pos += used;
                    let present = input.len().saturating_sub(*pos);
                    if !self.oom {
                        let mut arg = Vec::new();
                        if arg.try_reserve_exact(len.min(present)).is_err() || self.args.try_reserve(1).is_err() {
                            self.drop_request();
                        } else {
                            self.args.push(arg);
                        }
                    }
                    self.state = State::Bulk { need: len, trailer: 2, left: left - 1 };
                }
                State::Bulk { need, trailer, left } => {
                    let take = need.min(rest.len());
                    if !self.oom
                        && let Some(arg) = self.args.last_mut()
                    {
                        if grow_within(arg, take, arg.len() + need) {
                            arg.extend_from_slice(rest.get(..take).unwrap_or(&[]));
                        } else {
                            self.drop_request();
                        }
                    }
                    let skip = trailer.min(rest.len() - take);
                    *pos += take + skip;
                    let (need, trailer) = (need - take, trailer - skip);
                    if need > 0 || trailer > 0 {
                        self.state = State::Bulk { need, trailer, left };
                        return Ok(false);
                    }
                    if left == 0 {
                        self.state = State::Start;
                        return Ok(true);
                    }
                    self.state = State::Header { left };
                }
            }
        }
    }

    /// The arguments of the request [`Parser::parse`] reported ready (moved out by commands
    /// that keep them).
    pub fn args(&mut self) -> &mut [Vec<u8>] {
        &mut self.args
    }

    /// Forgets the request just run and gets ready for the next one.
    pub fn finish(&mut self) {
        self.args.clear();
        if self.args.capacity() > KEEP_ARGS {
            self.args = Vec::new();
        }
        self.charged = 0;
        self.oom = false;
        self.state = State::Start;
    }

    /// Whether the request [`Parser::parse`] reported ready could not be held in memory: its
    /// arguments were dropped as they came, and it must be answered with an OOM error.
    pub fn out_of_memory(&self) -> bool {
        self.oom
    }

    /// Frees what the request being parsed holds and reads the rest of it without keeping it.
    fn drop_request(&mut self) {
        self.oom = true;
        self.args = Vec::new();
    }

    #[cfg_attr(not(test), allow(dead_code))] // part of the core's API; the tests use it
    /// Heap bytes held for the unfinished request (argument buffers and their vector).
    pub fn held_bytes(&self) -> usize {
        self.args.capacity() * core::mem::size_of::<Vec<u8>>() + self.args.iter().map(Vec::capacity).sum::<usize>()
    }
}

/// Once this much of an argument has arrived, the rest of its announced length is reserved
/// in one step (Redis reserves a big argument's whole length as soon as its `$len` is read):
/// one more copy instead of seven doublings for a 512 MiB value, and no trail of freed
/// smaller buffers in the heap's extents.
const RESERVE_ALL_AFTER: usize = 4 << 20;

/// Makes room for `more` bytes in `arg` without reserving past `cap` (the argument's
/// announced length): doubling, so a value arriving in small pieces is copied O(1) times per
/// byte, but never more than twice what has arrived until [`RESERVE_ALL_AFTER`] has. False
/// if the memory cannot be had.
fn grow_within(arg: &mut Vec<u8>, more: usize, cap: usize) -> bool {
    let want = arg.len() + more;
    if want <= arg.capacity() {
        return true;
    }
    let doubled = if want >= RESERVE_ALL_AFTER { cap } else { arg.capacity().saturating_mul(2) };
    let target = want.max(doubled).min(cap);
    arg.try_reserve_exact(target - arg.len()).is_ok() || arg.try_reserve_exact(more).is_ok()
}

/// The `*…`/`$…` header line at the start of `rest` (without `\r`) and the bytes it spans with
/// its line end, or `None` if it is not complete yet. Like Redis, the line ends at `\r` and the
/// byte after it is skipped unchecked.
fn header_line(rest: &[u8], too_big: ProtocolError) -> Result<Option<(&[u8], usize)>, ProtocolError> {
    match memchr(b'\r', rest) {
        Some(cr) if cr >= MAX_INLINE_BYTES => Err(too_big),
        Some(cr) if cr + 2 <= rest.len() => Ok(Some((rest.get(..cr).unwrap_or(&[]), cr + 2))),
        Some(_) => Ok(None),
        None if rest.len() > MAX_INLINE_BYTES => Err(too_big),
        None => Ok(None),
    }
}

/// Index of the first `byte` in `hay`.
fn memchr(byte: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == byte)
}

/// Parses a decimal integer exactly as Redis's `string2ll`: optional `-`, no `+`, no spaces,
/// no leading zeros (except `0` itself), no `-0`, within `i64`.
pub fn parse_i64(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, s),
    };
    match digits {
        [] => return None,
        [b'0'] if !neg => return Some(0),
        [b'0', ..] => return None,
        _ => {}
    }
    if digits.len() > 19 {
        return None;
    }
    let mut v: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    if neg {
        if v > i64::MAX as u64 + 1 {
            return None;
        }
        Some((v as i64).wrapping_neg())
    } else {
        i64::try_from(v).ok()
    }
}

/// Whitespace as C's `isspace` in the "C" locale.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Splits an inline request into `args` as Redis's `sdssplitargs`: words separated by
/// blanks; `"…"` with `\n \r \t \b \a \xHH` and `\<any>` escapes; `'…'` with only `\'`;
/// a closing quote must be followed by whitespace or the end of the line. As in Redis (a C
/// string there), a NUL byte ends the line.
fn split_inline(line: &[u8], args: &mut Vec<Vec<u8>>) -> Result<(), ProtocolError> {
    let line = line.get(..memchr(0, line).unwrap_or(line.len())).unwrap_or(line);
    let mut i = 0;
    loop {
        while line.get(i).is_some_and(|&b| is_space(b)) {
            i += 1;
        }
        if i >= line.len() {
            return Ok(());
        }
        let mut word = Vec::new();
        let mut in_dq = false;
        let mut in_sq = false;
        loop {
            let c = line.get(i).copied();
            if in_dq {
                match c {
                    None => return Err(ProtocolError::UnbalancedQuotes),
                    Some(b'\\') => {
                        let next = line.get(i + 1).copied();
                        let hex =
                            (line.get(i + 2).copied().and_then(hex_val), line.get(i + 3).copied().and_then(hex_val));
                        match (next, hex) {
                            (Some(b'x'), (Some(h), Some(l))) => {
                                word.push(h * 16 + l);
                                i += 3;
                            }
                            (Some(n), _) => {
                                word.push(match n {
                                    b'n' => b'\n',
                                    b'r' => b'\r',
                                    b't' => b'\t',
                                    b'b' => 0x08,
                                    b'a' => 0x07,
                                    other => other,
                                });
                                i += 1;
                            }
                            (None, _) => word.push(b'\\'),
                        }
                    }
                    Some(b'"') => {
                        if line.get(i + 1).is_some_and(|&b| !is_space(b)) {
                            return Err(ProtocolError::UnbalancedQuotes);
                        }
                        i += 1;
                        break;
                    }
                    Some(b) => word.push(b),
                }
            } else if in_sq {
                match c {
                    None => return Err(ProtocolError::UnbalancedQuotes),
                    Some(b'\\') if line.get(i + 1) == Some(&b'\'') => {
                        word.push(b'\'');
                        i += 1;
                    }
                    Some(b'\'') => {
                        if line.get(i + 1).is_some_and(|&b| !is_space(b)) {
                            return Err(ProtocolError::UnbalancedQuotes);
                        }
                        i += 1;
                        break;
                    }
                    Some(b) => word.push(b),
                }
            } else {
                match c {
                    None | Some(b' ' | b'\n' | b'\r' | b'\t') => break,
                    Some(b'"') => in_dq = true,
                    Some(b'\'') => in_sq = true,
                    Some(b) => word.push(b),
                }
            }
            i += 1;
        }
        args.push(word);
    }
}

/// Appends a simple string reply: `+text\r\n`.
pub fn simple(out: &mut Vec<u8>, text: &str) {
    out.push(b'+');
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends an error reply `-text\r\n`; `\r` and `\n` in `text` become spaces, as Redis does.
pub fn error(out: &mut Vec<u8>, text: &[u8]) {
    out.push(b'-');
    out.extend(text.iter().map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }));
    out.extend_from_slice(b"\r\n");
}

/// Appends an integer reply: `:n\r\n`.
pub fn int(out: &mut Vec<u8>, n: i64) {
    out.push(b':');
    push_decimal(out, n);
    out.extend_from_slice(b"\r\n");
}

/// Appends a bulk string reply: `$len\r\ndata\r\n`.
pub fn bulk(out: &mut Vec<u8>, data: &[u8]) {
    out.reserve(data.len() + 16);
    out.push(b'$');
    push_decimal(out, data.len() as i64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Appends the null bulk reply: `$-1\r\n`.
pub fn null(out: &mut Vec<u8>) {
    out.extend_from_slice(b"$-1\r\n");
}

/// Appends an array header: `*n\r\n` (the `n` elements follow).
pub fn array(out: &mut Vec<u8>, n: usize) {
    out.push(b'*');
    push_decimal(out, n as i64);
    out.extend_from_slice(b"\r\n");
}

/// Appends `n` in decimal.
pub fn push_decimal(out: &mut Vec<u8>, n: i64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    let mut v = n.unsigned_abs();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if n < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&buf[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    /// Parses every complete request in `input`, one call; returns the requests and the
    /// bytes left over (or the error).
    type Request = Vec<Vec<u8>>;

    fn parse_all(input: &[u8]) -> Result<(Vec<Request>, usize), ProtocolError> {
        let mut p = Parser::new();
        let mut pos = 0;
        let mut reqs = Vec::new();
        while p.parse(input, &mut pos)? {
            reqs.push(p.args().to_vec());
            p.finish();
        }
        Ok((reqs, input.len() - pos))
    }

    fn words(ws: &[&str]) -> Vec<Vec<u8>> {
        ws.iter().map(|w| w.as_bytes().to_vec()).collect()
    }

    #[test]
    fn multibulk_and_inline_requests_parse() {
        let (reqs, left) = parse_all(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n  set  a   b \r\n").unwrap();
        assert_eq!(reqs, vec![words(&["GET", "k"]), words(&["PING"]), words(&["set", "a", "b"])]);
        assert_eq!(left, 0);
    }

    #[test]
    fn binary_bulks_are_taken_verbatim() {
        let (reqs, _) = parse_all(b"*2\r\n$4\r\n\r\n\0\xff\r\n$0\r\n\r\n").unwrap();
        assert_eq!(reqs, vec![vec![b"\r\n\0\xff".to_vec(), Vec::new()]]);
    }

    #[test]
    fn empty_lines_and_empty_multibulks_are_skipped() {
        let (reqs, left) = parse_all(b"\r\n\n*0\r\n*-1\r\n   \r\nPING\n").unwrap();
        assert_eq!(reqs, vec![words(&["PING"])]);
        assert_eq!(left, 0);
    }

    #[test]
    fn a_partial_line_is_left_unconsumed_and_bulk_data_is_absorbed() {
        let mut p = Parser::new();
        let mut pos = 0;
        assert_eq!(p.parse(b"*1\r\n$5\r\nhel", &mut pos), Ok(false));
        assert_eq!(pos, 11, "header lines and partial bulk data are taken in");
        let mut pos = 0;
        assert_eq!(p.parse(b"lo\r\n", &mut pos), Ok(true));
        assert_eq!(p.args(), &[b"hello".to_vec()]);
        p.finish();
        let mut pos = 0;
        assert_eq!(p.parse(b"*1\r\n$5", &mut pos), Ok(false));
        assert_eq!(pos, 4, "an unfinished $len line stays with the caller");
        let mut p = Parser::new();
        let mut pos = 0;
        assert_eq!(p.parse(b"PIN", &mut pos), Ok(false));
        assert_eq!(pos, 0);
    }

    #[test]
    fn like_redis_the_bytes_after_data_are_skipped_unchecked() {
        // Redis answers `*2 $4 ECHO $3 a\r\nb\r\n` with "a\r\n" and ignores the stray "\n".
        let (reqs, left) = parse_all(b"*2\r\n$4\r\nECHO\r\n$3\r\na\r\nb\r\n").unwrap();
        assert_eq!(reqs, vec![vec![b"ECHO".to_vec(), b"a\r\n".to_vec()]]);
        assert_eq!(left, 0);
    }

    #[test]
    fn protocol_errors_match_redis() {
        let cases: &[(&[u8], ProtocolError)] = &[
            (b"*x\r\n", ProtocolError::InvalidMultibulkLength),
            (b"*01\r\n", ProtocolError::InvalidMultibulkLength),
            (b"*+1\r\n", ProtocolError::InvalidMultibulkLength),
            (b"* 1\r\n", ProtocolError::InvalidMultibulkLength),
            (b"*1048577\r\n", ProtocolError::InvalidMultibulkLength),
            (b"*2\r\nx\r\n", ProtocolError::ExpectedDollar(b'x')),
            (b"*1\r\n$x\r\n", ProtocolError::InvalidBulkLength),
            (b"*1\r\n$-1\r\n", ProtocolError::InvalidBulkLength),
            (b"*1\r\n$04\r\n", ProtocolError::InvalidBulkLength),
            (b"*1\r\n$536870913\r\n", ProtocolError::InvalidBulkLength),
            (b"*1\r\n$4000000000\r\n", ProtocolError::InvalidBulkLength),
            (b"set \"a b\r\n", ProtocolError::UnbalancedQuotes),
            (b"set 'a'b' x\r\n", ProtocolError::UnbalancedQuotes),
            (b"set \"a\"b c\r\n", ProtocolError::UnbalancedQuotes),
        ];
        for (input, want) in cases {
            assert_eq!(parse_all(input), Err(*want), "{:?}", core::str::from_utf8(input));
        }
    }

    #[test]
    fn protocol_error_texts_are_redis_texts() {
        let mut out = Vec::new();
        ProtocolError::ExpectedDollar(b'x').reply(&mut out);
        ProtocolError::InvalidBulkLength.reply(&mut out);
        ProtocolError::ExpectedDollar(b'\r').reply(&mut out);
        assert_eq!(
            out,
            b"-ERR Protocol error: expected '$', got 'x'\r\n-ERR Protocol error: invalid bulk length\r\n-ERR Protocol error: expected '$', got ' '\r\n"
        );
        assert_eq!(
            alloc::format!("{}", ProtocolError::ExpectedDollar(0xff)),
            "ERR Protocol error: expected '$', got '\\xff'"
        );
    }

    #[test]
    fn line_caps_hold_whether_or_not_the_line_is_finished() {
        let mut long = vec![b'a'; MAX_INLINE_BYTES + 1];
        assert_eq!(parse_all(&long), Err(ProtocolError::TooBigInline));
        long.extend_from_slice(b"\r\n");
        assert_eq!(parse_all(&long), Err(ProtocolError::TooBigInline));
        let mut ok = vec![b'a'; MAX_INLINE_BYTES - 1];
        ok.extend_from_slice(b"\r\n");
        assert_eq!(parse_all(&ok).map(|(r, _)| r.len()), Ok(1));
        assert_eq!(parse_all(&ok[..MAX_INLINE_BYTES]).map(|(r, left)| (r.len(), left)), Ok((0, MAX_INLINE_BYTES)));

        let mut star = vec![b'*'];
        star.resize(MAX_INLINE_BYTES + 2, b'1');
        assert_eq!(parse_all(&star), Err(ProtocolError::TooBigMultibulkCount));
        // An unfinished header never leaves more than the cap with the caller.
        let mut edge = vec![b'*'];
        edge.resize(MAX_INLINE_BYTES - 1, b'1');
        edge.push(b'\r');
        assert_eq!(parse_all(&edge).map(|(r, left)| (r.len(), left)), Ok((0, MAX_INLINE_BYTES)));
        edge.insert(1, b'1');
        assert_eq!(parse_all(&edge), Err(ProtocolError::TooBigMultibulkCount));
        let mut dollar = b"*1\r\n$".to_vec();
        dollar.resize(MAX_INLINE_BYTES + 10, b'1');
        assert_eq!(parse_all(&dollar), Err(ProtocolError::TooBigBulkCount));
    }

    #[test]
    fn huge_announced_lengths_reserve_nothing_up_front() {
        let mut p = Parser::new();
        let mut pos = 0;
        assert_eq!(p.parse(b"*1048576\r\n$8388608\r\nabc", &mut pos), Ok(false));
        assert!(p.held_bytes() < 1024, "held {} bytes", p.held_bytes());
        // Arriving data grows the buffer at most to twice what arrived (and never past the
        // announced length).
        let chunk = vec![b'x'; 100_000];
        let mut got = 3;
        while got < 1_000_000 {
            let mut pos = 0;
            assert_eq!(p.parse(&chunk, &mut pos), Ok(false));
            got += chunk.len();
            assert!(p.held_bytes() <= 2 * got + 1024, "held {} after {got}", p.held_bytes());
        }
    }

    #[test]
    fn past_4_mib_the_whole_announced_length_is_reserved_at_once() {
        let mut p = Parser::new();
        let mut pos = 0;
        assert_eq!(p.parse(b"*1\r\n$16777216\r\n", &mut pos), Ok(false));
        let chunk = vec![b'x'; 1 << 20];
        for mib in 1..=5 {
            let mut pos = 0;
            assert_eq!(p.parse(&chunk, &mut pos), Ok(false));
            let held = p.held_bytes();
            if mib <= 4 {
                assert!(held <= 2 * (mib << 20) + 1024, "held {held} after {mib} MiB");
            } else {
                assert!((16 << 20..(16 << 20) + 1024).contains(&held), "held {held} after {mib} MiB");
            }
        }
    }

    #[test]
    fn a_complete_bulk_gets_an_exact_buffer() {
        let mut p = Parser::new();
        let mut pos = 0;
        assert_eq!(p.parse(b"*1\r\n$5\r\nhello\r\n", &mut pos), Ok(true));
        assert_eq!(p.args()[0].capacity(), 5);
    }

    #[test]
    fn request_total_is_capped() {
        // Two 512 MiB arguments pass the 1 GiB cap only with their overhead: refused when the
        // second one is announced (the first one's data fed 1 MiB at a time).
        let mut p = Parser::new();
        let mut pos = 0;
        assert_eq!(p.parse(b"*3\r\n$536870912\r\n", &mut pos), Ok(false));
        let chunk = vec![b'v'; 1 << 20];
        for _ in 0..512 {
            let mut pos = 0;
            assert_eq!(p.parse(&chunk, &mut pos), Ok(false));
        }
        let mut pos = 0;
        assert_eq!(p.parse(b"\r\n$536870912\r\n", &mut pos), Err(ProtocolError::TooBigRequest));
    }

    #[test]
    fn inline_quoting_follows_sdssplitargs() {
        let (reqs, _) = parse_all(b"set \"a b\" \"c\\x41\\n\\q\\x4g\" 'it\\'s' \"\" ''\tx\rPING\r\n").unwrap();
        assert_eq!(
            reqs,
            vec![vec![
                b"set".to_vec(),
                b"a b".to_vec(),
                b"cA\nqx4g".to_vec(),
                b"it's".to_vec(),
                Vec::new(),
                Vec::new(),
                b"x".to_vec(),
                b"PING".to_vec()
            ]]
        );
    }

    #[test]
    fn only_blanks_split_inline_words() {
        let (reqs, _) = parse_all(b"ECHO a\x0bb\r\n\x0c PING\r\n").unwrap();
        assert_eq!(reqs, vec![words(&["ECHO", "a\x0bb"]), words(&["PING"])]);
    }

    #[test]
    fn like_redis_an_inline_nul_hides_the_line_end_until_the_inline_cap() {
        // Redis looks for the line end with strchr: a NUL before it leaves the line
        // unfinished (nothing runs, not even what follows), until the input passes 64 KiB.
        let (reqs, left) = parse_all(b"SET k a\0bc\r\nPING\r\n").unwrap();
        assert!(reqs.is_empty());
        assert_eq!(left, 18);
        let mut long = b"SET k a\0bc\r\n".to_vec();
        long.resize(MAX_INLINE_BYTES + 1, b'x');
        assert_eq!(parse_all(&long), Err(ProtocolError::TooBigInline));
        // Quoted, a NUL is an ordinary byte of the argument.
        let (reqs, _) = parse_all(b"SET k \"a\\x00bc\"\r\n").unwrap();
        assert_eq!(reqs, vec![vec![b"SET".to_vec(), b"k".to_vec(), b"a\0bc".to_vec()]]);
    }

    #[test]
    fn integers_parse_like_string2ll() {
        for (s, want) in [
            ("0", Some(0)),
            ("-1", Some(-1)),
            ("9223372036854775807", Some(i64::MAX)),
            ("-9223372036854775808", Some(i64::MIN)),
            ("9223372036854775808", None),
            ("-9223372036854775809", None),
            ("99999999999999999999", None),
            ("", None),
            ("-", None),
            ("-0", None),
            ("01", None),
            ("+1", None),
            (" 1", None),
            ("1 ", None),
            ("1a", None),
        ] {
            assert_eq!(parse_i64(s.as_bytes()), want, "{s:?}");
        }
    }

    #[test]
    fn writers_produce_resp() {
        let mut out = Vec::new();
        simple(&mut out, "OK");
        error(&mut out, b"ERR a\r\nb");
        int(&mut out, -42);
        int(&mut out, i64::MIN);
        bulk(&mut out, b"hi");
        null(&mut out);
        array(&mut out, 0);
        assert_eq!(out, b"+OK\r\n-ERR a  b\r\n:-42\r\n:-9223372036854775808\r\n$2\r\nhi\r\n$-1\r\n*0\r\n".to_vec());
    }
}
