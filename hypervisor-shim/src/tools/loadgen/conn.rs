//! One persistent TCP connection to the service, with a receive buffer and deadlines.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Why an exchange on a connection failed. After any of these the connection is dropped: its
/// stream may hold a late or partial answer.
#[derive(Debug, Error)]
pub enum ConnError {
    /// No complete answer before the deadline.
    #[error("no answer within the timeout")]
    Timeout,
    /// The service closed the connection.
    #[error("the service closed the connection")]
    Closed,
    /// Any other socket error.
    #[error("{0}")]
    Io(io::Error),
    /// The answer grew beyond the limit without completing.
    #[error("an answer grew beyond {0} bytes")]
    TooLarge(usize),
    /// The answer is not valid for the protocol.
    #[error("malformed answer: {0}")]
    Malformed(String),
}

impl ConnError {
    fn from_io(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ConnError::Timeout,
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
                ConnError::Closed
            }
            _ => ConnError::Io(e),
        }
    }
}

/// A connection with its receive buffer.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Unread bytes are `buf[pos..len]`.
    pos: usize,
    len: usize,
    /// The read timeout currently set on the socket.
    read_timeout: Duration,
}

const INITIAL_BUFFER: usize = 16 << 10;

impl Conn {
    /// Connects to `addr` within `timeout`; reads and writes then time out after `timeout`.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Conn { stream, buf: vec![0; INITIAL_BUFFER], pos: 0, len: 0, read_timeout: timeout })
    }

    /// Sends all of `bytes`.
    pub fn send(&mut self, bytes: &[u8]) -> Result<(), ConnError> {
        self.stream.write_all(bytes).map_err(ConnError::from_io)
    }

    /// Reads until `parse` finds a complete frame in the unread bytes, which it returns with
    /// the number of bytes it used; `Ok(None)` from `parse` asks for more bytes. Fails once
    /// `deadline` passes or more than `max` unread bytes accumulate.
    pub fn read_frame<T, E: std::fmt::Display>(
        &mut self,
        deadline: Instant,
        max: usize,
        mut parse: impl FnMut(&[u8]) -> Result<Option<(T, usize)>, E>,
    ) -> Result<T, ConnError> {
        loop {
            // Parse even when nothing is unread: an empty frame (a zero-length body) is complete.
            let unread = &self.buf[self.pos..self.len];
            if let Some((frame, used)) = parse(unread).map_err(|e| ConnError::Malformed(e.to_string()))? {
                self.consume(used.min(unread.len()));
                return Ok(frame);
            }
            if unread.len() > max {
                return Err(ConnError::TooLarge(max));
            }
            self.fill(deadline)?;
        }
    }

    /// Reads until the service closes the connection (for HTTP bodies framed by the close),
    /// returning how many bytes arrived beyond what was unread. Fails past `deadline` or
    /// beyond `max` bytes.
    pub fn read_to_close(&mut self, deadline: Instant, max: usize) -> Result<usize, ConnError> {
        let before = self.len - self.pos;
        loop {
            if self.len - self.pos > max {
                return Err(ConnError::TooLarge(max));
            }
            match self.fill(deadline) {
                Ok(()) => {}
                Err(ConnError::Closed) => {
                    let total = self.len - self.pos;
                    self.consume(total);
                    return Ok(total - before);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
        if self.pos == self.len {
            self.pos = 0;
            self.len = 0;
        }
    }

    /// Reads once more into the buffer.
    fn fill(&mut self, deadline: Instant) -> Result<(), ConnError> {
        if self.pos > 0 && self.len == self.buf.len() {
            self.buf.copy_within(self.pos..self.len, 0);
            self.len -= self.pos;
            self.pos = 0;
        }
        if self.len == self.buf.len() {
            let grown = self.buf.len() * 2;
            self.buf.resize(grown, 0);
        }
        loop {
            let now = Instant::now();
            let remaining = deadline.checked_duration_since(now).filter(|d| !d.is_zero()).ok_or(ConnError::Timeout)?;
            // Setting the socket timeout costs a system call: shorten it only when the deadline
            // is noticeably closer than the timeout already set. One that is too short merely
            // wakes the read early, and the loop then waits again for what remains.
            if remaining + Duration::from_millis(1) < self.read_timeout {
                self.stream.set_read_timeout(Some(remaining)).map_err(ConnError::Io)?;
                self.read_timeout = remaining;
            }
            match self.stream.read(&mut self.buf[self.len..]) {
                Ok(0) => return Err(ConnError::Closed),
                Ok(n) => {
                    self.len += n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    if Instant::now() >= deadline {
                        return Err(ConnError::Timeout);
                    }
                    // The socket's timeout was shorter than this deadline: wait for the rest.
                    let rest = deadline.saturating_duration_since(Instant::now()).max(Duration::from_micros(1));
                    self.stream.set_read_timeout(Some(rest)).map_err(ConnError::Io)?;
                    self.read_timeout = rest;
                }
                Err(e) => return Err(ConnError::from_io(e)),
            }
        }
    }
}
