//! The migration channel's framing: messages `[kind: u8][len: u64 LE][payload]`, and the page
//! runs inside a `P` message (`[gpa u64][pages u32][data]`, repeated).

use std::io::{Read, Write};
use std::os::fd::OwnedFd;

use serde::Serialize;
use thiserror::Error;

use super::channel::Channel;
use crate::base::memory::PAGE_SIZE;

/// Framing failures.
#[derive(Debug, Error)]
pub enum WireError {
    /// The socket failed.
    #[error("migration channel: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the channel before the message it owed.
    #[error("migration protocol: the peer closed the channel")]
    PeerClosed,
    /// The peer sent something malformed (a message too long, a truncated page run).
    #[error("migration protocol: {0}")]
    Malformed(String),
}

/// Writes one message.
pub(crate) fn write_msg(s: &mut Channel, kind: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = kind;
    head[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    s.write_all(&head)?;
    s.write_all(payload)
}

/// Writes one message with descriptor `fd` attached to its header (Unix only).
pub(crate) fn write_msg_with_fd(
    s: &mut Channel,
    kind: u8,
    fd: std::os::fd::RawFd,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut head = vec![kind];
    head.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    s.write_with_fd(&head, fd, payload)
}

/// Reads one message; a descriptor sent with its header is returned too.
pub(crate) fn read_msg(s: &mut Channel, max: u64) -> Result<(u8, Vec<u8>, Option<OwnedFd>), WireError> {
    let mut payload = Vec::new();
    let (kind, len, file) = read_msg_into(s, max, &mut payload)?;
    payload.truncate(len);
    Ok((kind, payload, file))
}

/// Reads one message into `buf` (grown when needed, never shrunk or cleared: a receiver of
/// thousands of 4 MiB page batches allocates and zeroes one); returns its kind, its length
/// (the payload is `buf[..len]`) and the descriptor sent with its header.
pub(crate) fn read_msg_into(
    s: &mut Channel,
    max: u64,
    buf: &mut Vec<u8>,
) -> Result<(u8, usize, Option<OwnedFd>), WireError> {
    let mut head = [0u8; 9];
    let (n, file) = s.read_with_fd(&mut head)?;
    if n == 0 {
        return Err(WireError::PeerClosed);
    }
    s.read_exact(&mut head[n..])?;
    let len = u64::from_le_bytes(head[1..].try_into().unwrap_or([0; 8]));
    if len > max {
        return Err(WireError::Malformed(format!("a '{}' message of {len} bytes", head[0] as char)));
    }
    let len = len as usize;
    if buf.len() < len {
        buf.resize(len, 0);
    }
    s.read_exact(&mut buf[..len])?;
    Ok((head[0], len, file))
}

/// Tells the source whether the VM was built here (`A`, or `E` with why not); `Err` says
/// the source could not be told (it then runs the VM on).
pub(crate) fn tell(s: &mut Channel, result: &Result<(), String>) -> Result<(), String> {
    match result {
        Ok(()) => write_msg(s, b'A', &[]),
        Err(e) => write_msg(s, b'E', &json(e)),
    }
    .and_then(|()| s.flush())
    .map_err(|e| format!("the source was not told the VM is ready ({e}): it runs there"))
}

/// The reason an `E` message carries.
pub(crate) fn refusal(payload: &[u8]) -> String {
    serde_json::from_slice::<String>(payload).unwrap_or_else(|_| "unknown error".into())
}

/// `v` as JSON.
pub(crate) fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// Appends one page run (`pages` whole pages of `data` at `gpa`) to a `P` message.
pub(crate) fn push_run(buf: &mut Vec<u8>, gpa: u64, data: &[u8]) {
    buf.extend_from_slice(&gpa.to_le_bytes());
    buf.extend_from_slice(&((data.len() as u64 / PAGE_SIZE) as u32).to_le_bytes());
    buf.extend_from_slice(data);
}

/// The page runs of a `P` message, `(gpa, data)` each, every one checked against the
/// message's length.
pub(crate) fn runs(mut payload: &[u8]) -> impl Iterator<Item = Result<(u64, &[u8]), WireError>> {
    std::iter::from_fn(move || {
        if payload.is_empty() {
            return None;
        }
        if payload.len() < 12 {
            payload = &[];
            return Some(Err(WireError::Malformed("a truncated page run".into())));
        }
        let gpa = u64::from_le_bytes(payload[..8].try_into().unwrap_or([0; 8]));
        let n = u32::from_le_bytes(payload[8..12].try_into().unwrap_or([0; 4])) as usize;
        let len = n.checked_mul(PAGE_SIZE as usize).filter(|&l| l <= payload.len() - 12);
        let Some(len) = len else {
            payload = &[];
            return Some(Err(WireError::Malformed("a page run longer than its message".into())));
        };
        let data = &payload[12..12 + len];
        payload = &payload[12 + len..];
        Some(Ok((gpa, data)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_read_back_what_push_run_wrote_and_refuse_lies() {
        let mut buf = Vec::new();
        push_run(&mut buf, 0x1000, &[1u8; 8192]);
        push_run(&mut buf, 0x9000, &[2u8; 4096]);
        let got: Vec<(u64, usize, u8)> =
            runs(&buf).map(|r| r.map(|(g, d)| (g, d.len(), d[0]))).collect::<Result<_, _>>().unwrap();
        assert_eq!(got, vec![(0x1000, 8192, 1), (0x9000, 4096, 2)]);
        // A run that claims more pages than the message holds.
        let mut lie = Vec::new();
        lie.extend_from_slice(&0u64.to_le_bytes());
        lie.extend_from_slice(&3u32.to_le_bytes());
        lie.extend_from_slice(&[0u8; 4096]);
        assert!(matches!(runs(&lie).next(), Some(Err(WireError::Malformed(_)))));
        assert!(matches!(runs(&[0u8; 5]).next(), Some(Err(WireError::Malformed(_)))));
    }
}
