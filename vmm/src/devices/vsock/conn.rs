//! One client connection of the vsock device: the client's socket, the connection's state
//! machine, the bytes waiting in each direction and the vsock credit both ways; and the
//! control packets the device sends on a connection's behalf.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use hypercall_abi::virtio::vsock::HOST_BUF_ALLOC;

/// Vsock packet types and operations (virtio spec 5.10.6), shared with the guest.
pub(super) use hypercall_abi::virtio::vsock::op;

/// A client's socket.
#[derive(Debug)]
pub(super) enum HostStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl HostStream {
    pub(super) fn fd(&self) -> RawFd {
        match self {
            HostStream::Tcp(s) => s.as_raw_fd(),
            HostStream::Unix(s) => s.as_raw_fd(),
        }
    }

    pub(super) fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            HostStream::Tcp(s) => s.read(buf),
            HostStream::Unix(s) => s.read(buf),
        }
    }

    pub(super) fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            HostStream::Tcp(s) => s.write(buf),
            HostStream::Unix(s) => s.write(buf),
        }
    }

    /// Makes closing send a reset (SO_LINGER with a zero timeout) on a TCP client, which then
    /// sees "connection refused/reset" at once; a Unix client just sees the close.
    pub(super) fn reset_on_close(&self) {
        if let HostStream::Tcp(s) = self {
            let linger = libc::linger { l_onoff: 1, l_linger: 0 };
            // SAFETY: setsockopt on a socket this connection owns, with a pointer to a
            // `linger` that lives across the call and its exact size.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&raw const linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
            }
        }
    }

    pub(super) fn shutdown_write(&self) {
        let _ = match self {
            HostStream::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
            HostStream::Unix(s) => s.shutdown(std::net::Shutdown::Write),
        };
    }

    /// Non-blocking, and for TCP without Nagle's delay.
    pub(super) fn prepare(&self) -> std::io::Result<()> {
        match self {
            HostStream::Tcp(s) => s.set_nonblocking(true).and_then(|_| s.set_nodelay(true)),
            HostStream::Unix(s) => s.set_nonblocking(true),
        }
    }
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// Hybrid socket: waiting for `CONNECT <port>\n`.
    Handshake { deadline: Instant },
    /// Waiting for the guest's RESPONSE (or for the device to come up).
    Connecting { deadline: Instant, retry_at: Option<Instant>, attempts: u32, sent: bool },
    /// Data flows both ways.
    Established,
    /// The client closed: SHUTDOWN sent, waiting for the guest's RST.
    ClientClosed { deadline: Instant },
    /// The guest shut down: flushing what it sent, then closing.
    GuestClosed,
}

/// One connection.
#[derive(Debug)]
pub(super) struct Conn {
    pub(super) stream: HostStream,
    pub(super) guest_port: u32,
    pub(super) state: State,
    pub(super) uds: bool,
    pub(super) readable: bool,
    /// The socket reported a hang-up (EOF may follow the data): read it to the end.
    pub(super) hung_up: bool,
    pub(super) writable: bool,
    /// The client's socket reported EOF or an error.
    pub(super) client_eof: bool,
    /// Bytes from the guest not yet written to the client (at most HOST_BUF_ALLOC).
    pub(super) outbound: VecDeque<u8>,
    /// Bytes read from the client not yet delivered (at most one packet).
    pub(super) inbound: Vec<u8>,
    /// In the RX ready list.
    pub(super) queued: bool,
    pub(super) handshake: Vec<u8>,
    /// Bytes at the front of `outbound` that are the host's own (the hybrid protocol's OK
    /// line), not guest data: writing them frees no guest credit.
    pub(super) preamble: usize,
    // Credit: the guest's receive buffer and what it consumed; what the host sent it.
    pub(super) peer_buf_alloc: u32,
    pub(super) peer_fwd_cnt: u32,
    pub(super) rx_cnt: u32,
    // Credit: bytes the host forwarded to the client, and the figure last told the guest.
    pub(super) fwd_cnt: u32,
    pub(super) fwd_cnt_told: u32,
    pub(super) credit_requested: bool,
}

impl Conn {
    /// A new connection from `stream` in `state` (`guest_port` 0 until a hybrid client names it).
    pub(super) fn new(stream: HostStream, guest_port: u32, state: State, uds: bool) -> Conn {
        Conn {
            stream,
            guest_port,
            state,
            uds,
            readable: uds,
            hung_up: false,
            writable: true,
            client_eof: false,
            outbound: VecDeque::new(),
            inbound: Vec::new(),
            queued: false,
            handshake: Vec::new(),
            preamble: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            credit_requested: false,
        }
    }

    /// Room the guest advertised that the host has not used yet.
    pub(super) fn guest_free(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.rx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Room in the buffer towards the client (the credit the host advertised).
    pub(super) fn host_free(&self) -> usize {
        (HOST_BUF_ALLOC as usize).saturating_sub(self.outbound.len())
    }
}

/// A control packet to send.
#[derive(Debug, Clone, Copy)]
pub(super) struct Control {
    pub(super) guest_port: u32,
    pub(super) host_port: u32,
    pub(super) op: u16,
    pub(super) flags: u32,
}

impl Control {
    /// A control packet with no flags.
    pub(super) fn new(guest_port: u32, host_port: u32, op: u16) -> Control {
        Control { guest_port, host_port, op, flags: 0 }
    }
}

/// Longest `CONNECT <port>\n` line accepted on the hybrid socket.
pub(super) const CONNECT_LINE_MAX: usize = 32;

/// Parses a complete hybrid-vsock `CONNECT <port>` line (without the newline; the keyword is
/// case-insensitive, as Firecracker's is).
pub(super) fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let (word, port) = text.split_once(' ')?;
    if !word.eq_ignore_ascii_case("connect") {
        return None;
    }
    port.trim().parse::<u32>().ok().filter(|&p| p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect_line(b"connect 52\r"), Some(52));
        assert_eq!(parse_connect_line(b"CONNECT x"), None);
        assert_eq!(parse_connect_line(b"HELLO 52"), None);
        assert_eq!(parse_connect_line(b"CONNECT 0"), None);
    }
}
