//! The migration channel: a Unix socket on one host (descriptors travel with the stream: the
//! published listening sockets and, later, memory), or TCP between hosts, always inside
//! mutual TLS 1.3 (`rustls`, `ring`): each side proves itself with a certificate signed by the
//! CA the other side was given. There is no plaintext TCP channel.
//!
//! Addresses are written `unix:PATH` or `tcp:HOST:PORT` (`HOST` a name or an address;
//! IPv6 in brackets). The source checks the target's certificate against `HOST`; the target
//! accepts any client whose certificate chains to its CA.

use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, StreamOwned};
use thiserror::Error;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// How long a TCP connect, and a TLS handshake, may take.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a channel could not be set up.
#[derive(Debug, Error)]
pub enum ChannelError {
    /// The address is not `unix:PATH` or `tcp:HOST:PORT`.
    #[error("{0}")]
    Address(String),
    /// A certificate, key or CA file could not be used.
    #[error("{what} {path}: {reason}")]
    TlsFile {
        /// Which file ("--tls-cert", …).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The TLS configuration was refused (e.g. the key does not match the certificate).
    #[error("TLS: {0}")]
    Tls(String),
    /// Connecting or the handshake failed.
    #[error("{peer}: {reason}")]
    Connect {
        /// The address.
        peer: String,
        /// Why.
        reason: String,
    },
}

/// The three PEM files of mutual TLS: this side's certificate (chain) and private key, and the
/// CA that signs the other side's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// This side's certificate chain (PEM).
    pub cert: PathBuf,
    /// This side's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificate(s) the peer's certificate must chain to (PEM).
    pub ca: PathBuf,
}

/// How much plaintext a TLS connection takes before it writes (rustls's default, 64 KiB, cuts
/// a 4 MiB page batch into 64 writes).
const TLS_BUFFER: usize = 4 << 20;
/// Reads from the socket go through a buffer this big (rustls reads 4 KiB at a time).
const READ_BUFFER: usize = 256 << 10;

/// `ring`: small and quick to build. rustls marks it deprecated because it has no
/// post-quantum key exchange (X25519MLKEM768 needs the `aws-lc-rs` provider, a large C build);
/// docs/design.md records the choice. AES-128-GCM first: the cheapest suite with AES-NI.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

/// A TCP socket whose reads are buffered (writes go straight through).
#[derive(Debug)]
pub(crate) struct Sock(std::io::BufReader<TcpStream>);

impl Sock {
    fn new(s: TcpStream) -> Sock {
        Sock(std::io::BufReader::with_capacity(READ_BUFFER, s))
    }

    fn tcp(&self) -> &TcpStream {
        self.0.get_ref()
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.get_mut().write(buf)
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.0.get_mut().write_vectored(bufs)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.get_mut().flush()
    }
}

impl TlsFiles {
    fn certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, ChannelError> {
        let bad = |reason: String| ChannelError::TlsFile { what, path: path.to_path_buf(), reason };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| bad(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("no PEM certificate in it".into()));
        }
        Ok(certs)
    }

    fn key(&self) -> Result<PrivateKeyDer<'static>, ChannelError> {
        PrivateKeyDer::from_pem_file(&self.key).map_err(|e| ChannelError::TlsFile {
            what: "--tls-key",
            path: self.key.clone(),
            reason: e.to_string(),
        })
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, ChannelError> {
        let mut roots = RootCertStore::empty();
        for c in Self::certs(&self.ca, "--tls-ca")? {
            roots.add(c).map_err(|e| ChannelError::TlsFile {
                what: "--tls-ca",
                path: self.ca.clone(),
                reason: e.to_string(),
            })?;
        }
        Ok(Arc::new(roots))
    }

    /// The configuration of the side that connects (the source).
    pub(crate) fn client_config(&self) -> Result<Arc<ClientConfig>, ChannelError> {
        let tls = |e: rustls::Error| ChannelError::Tls(e.to_string());
        let (certs, key, roots) = (Self::certs(&self.cert, "--tls-cert")?, self.key()?, self.roots()?);
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(tls)?;
        let mut config = config;
        // One connection per migration: nothing to resume.
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }

    /// The configuration of the side that listens (the target): a client certificate is
    /// required.
    pub(crate) fn server_config(&self) -> Result<Arc<ServerConfig>, ChannelError> {
        let tls = |e: rustls::Error| ChannelError::Tls(e.to_string());
        let (certs, key, roots) = (Self::certs(&self.cert, "--tls-cert")?, self.key()?, self.roots()?);
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| ChannelError::Tls(e.to_string()))?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(tls)?;
        let mut config = config;
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }
}

/// Where a VM migrates to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A receiver on this host (`unix:PATH`).
    Unix(PathBuf),
    /// A receiver on another host (`tcp:HOST:PORT`), over mutual TLS.
    Tcp {
        /// The host, as its certificate names it.
        host: String,
        /// The port.
        port: u16,
        /// This side's certificate and key, and the target's CA.
        tls: TlsFiles,
    },
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Unix(p) => write!(f, "unix:{}", p.display()),
            Destination::Tcp { host, port, .. } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Destination::Tcp { host, port, .. } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

/// Splits `HOST:PORT` (IPv6 hosts in brackets).
pub(crate) fn host_port(s: &str) -> Result<(String, u16), ChannelError> {
    let bad = || ChannelError::Address(format!("expected HOST:PORT, got {s}"));
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() || host.contains(['[', ']']) || (host.contains(':') && !s.starts_with('[')) {
        return Err(bad());
    }
    let port = port.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(bad)?;
    Ok((host.to_string(), port))
}

impl Destination {
    /// Parses `unix:PATH` or `tcp:HOST:PORT`; a TCP destination needs `tls`.
    pub fn parse(to: &str, tls: Option<TlsFiles>) -> Result<Destination, ChannelError> {
        if let Some(path) = to.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(ChannelError::Address("unix: needs a path".into()));
            }
            return Ok(Destination::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = to.strip_prefix("tcp:") {
            let (host, port) = host_port(rest)?;
            let tls = tls.ok_or_else(|| {
                ChannelError::Address(format!(
                    "{to}: a TCP migration is always mutual TLS: give the certificate, key and CA files"
                ))
            })?;
            return Ok(Destination::Tcp { host, port, tls });
        }
        Err(ChannelError::Address(format!("expected unix:PATH or tcp:HOST:PORT, got {to}")))
    }

    /// Connects, and for TCP completes the TLS handshake (the target's certificate is checked
    /// here; this side's is checked by the target, which answers the first message).
    pub(crate) fn connect(&self) -> Result<Channel, ChannelError> {
        let failed = |reason: String| ChannelError::Connect { peer: self.to_string(), reason };
        match self {
            Destination::Unix(path) => Ok(Channel::Unix(UnixStream::connect(path).map_err(|e| failed(e.to_string()))?)),
            Destination::Tcp { host, port, tls } => {
                let config = tls.client_config()?;
                let name = ServerName::try_from(host.clone()).map_err(|e| failed(e.to_string()))?;
                let addrs: Vec<SocketAddr> =
                    (host.as_str(), *port).to_socket_addrs().map_err(|e| failed(e.to_string()))?.collect();
                let mut last = String::from("no address");
                let mut sock = None;
                for a in &addrs {
                    match TcpStream::connect_timeout(a, HANDSHAKE_TIMEOUT) {
                        Ok(s) => {
                            sock = Some(s);
                            break;
                        }
                        Err(e) => last = e.to_string(),
                    }
                }
                let sock = sock.ok_or_else(|| failed(last))?;
                let _ = sock.set_nodelay(true);
                let mut sock = Sock::new(sock);
                let mut conn = ClientConnection::new(config, name).map_err(|e| failed(e.to_string()))?;
                conn.set_buffer_limit(Some(TLS_BUFFER));
                handshake(&mut conn, &mut sock, Instant::now() + HANDSHAKE_TIMEOUT).map_err(failed)?;
                Ok(Channel::TlsClient(Box::new(StreamOwned::new(conn, sock))))
            }
        }
    }
}

/// Completes a TLS handshake on `sock` by `deadline` (a peer that trickles bytes cannot hold
/// it longer: the deadline is checked between single reads and writes, which rustls's
/// `complete_io` would loop over by itself), then leaves the socket without time limits.
fn handshake<D>(conn: &mut rustls::ConnectionCommon<D>, sock: &mut Sock, deadline: Instant) -> Result<(), String> {
    let io = |e: std::io::Error| e.to_string();
    let step = |conn: &mut rustls::ConnectionCommon<D>, sock: &mut Sock| -> Result<(), String> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("not done within {} s", HANDSHAKE_TIMEOUT.as_secs()));
        }
        sock.tcp().set_read_timeout(Some(left)).map_err(io)?;
        sock.tcp().set_write_timeout(Some(left)).map_err(io)?;
        if conn.wants_write() {
            conn.write_tls(sock).map_err(io)?;
        } else if conn.read_tls(sock).map_err(io)? == 0 {
            return Err("the peer closed the connection".into());
        } else if let Err(e) = conn.process_new_packets() {
            // The alert that says why (a bad certificate) goes out if it can, at once.
            let _ = sock.tcp().set_write_timeout(Some(Duration::from_millis(100)));
            let _ = conn.write_tls(sock);
            return Err(e.to_string());
        }
        Ok(())
    };
    while conn.is_handshaking() || conn.wants_write() {
        step(conn, sock).map_err(|e| format!("TLS handshake: {e}"))?;
    }
    sock.tcp().set_read_timeout(None).map_err(io)?;
    sock.tcp().set_write_timeout(None).map_err(io)
}

/// A finished handshake: the channel, or why the client was turned away.
type Handshake = Result<Channel, String>;

/// Handshakes that may run at once on a listener: more connections wait in its backlog.
const MAX_HANDSHAKES: usize = 4;

/// A listening TCP socket that hands out TLS channels. Each handshake runs on a thread of its
/// own, bounded in time, so a client that connects and says nothing holds nobody up.
#[derive(Debug)]
pub(crate) struct TlsListener {
    listener: TcpListener,
    config: Arc<ServerConfig>,
    /// Finished handshakes: a channel, or why a client was turned away.
    done: (Sender<Handshake>, Receiver<Handshake>),
    /// Written when a handshake finishes (the waiter polls it).
    finished: Arc<EventFd>,
    running: Arc<AtomicUsize>,
}

impl TlsListener {
    /// Listens on `addr` with the server side of `tls`.
    pub(crate) fn bind(addr: &str, tls: &TlsFiles) -> Result<TlsListener, ChannelError> {
        let config = tls.server_config()?;
        let (host, port) = host_port(addr)?;
        let failed = |e: std::io::Error| ChannelError::Connect { peer: format!("tcp:{addr}"), reason: e.to_string() };
        let listener = TcpListener::bind((host.as_str(), port)).map_err(failed)?;
        listener.set_nonblocking(true).map_err(failed)?;
        let finished = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(failed)?);
        Ok(TlsListener { listener, config, done: channel(), finished, running: Arc::default() })
    }

    /// The descriptors to poll for [`TlsListener::accept`]: the socket (-1, which poll skips,
    /// while [`MAX_HANDSHAKES`] run: the clients waiting in its backlog would wake the poll at
    /// once, again and again) and the handshakes' eventfd.
    pub(crate) fn fds(&self) -> [RawFd; 2] {
        let full = self.running.load(Ordering::Acquire) >= MAX_HANDSHAKES;
        [if full { -1 } else { self.listener.as_raw_fd() }, self.finished.as_raw_fd()]
    }

    /// A source whose handshake finished, if there is one; starts the handshake of each client
    /// that connected. `Err`: a client turned away (why), or the socket failed.
    pub(crate) fn accept(&self) -> std::io::Result<Option<Handshake>> {
        let _ = self.finished.read();
        if let Ok(done) = self.done.1.try_recv() {
            // Another may have finished too: the next poll must not sleep past it.
            let _ = self.finished.write(1);
            return Ok(Some(done));
        }
        while self.running.load(Ordering::Acquire) < MAX_HANDSHAKES {
            let (sock, peer) = match self.listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            self.running.fetch_add(1, Ordering::AcqRel);
            let (config, tx) = (Arc::clone(&self.config), self.done.0.clone());
            let (finished, running) = (Arc::clone(&self.finished), Arc::clone(&self.running));
            let spawned = std::thread::Builder::new().name("tls-handshake".into()).spawn(move || {
                /// Frees the slot however the thread ends.
                struct Slot(Arc<AtomicUsize>);
                impl Drop for Slot {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::AcqRel);
                    }
                }
                let slot = Slot(running);
                let result = server_handshake(config, sock).map_err(|e| format!("{peer}: {e}"));
                drop(slot);
                let _ = tx.send(result);
                let _ = finished.write(1);
            });
            if let Err(e) = spawned {
                self.running.fetch_sub(1, Ordering::AcqRel);
                return Ok(Some(Err(format!("{peer}: no thread for its handshake: {e}"))));
            }
        }
        Ok(None)
    }
}

/// The server side of a handshake with a client just accepted: its certificate must chain to
/// the CA. Bounded by [`HANDSHAKE_TIMEOUT`].
fn server_handshake(config: Arc<ServerConfig>, sock: TcpStream) -> Result<Channel, String> {
    sock.set_nonblocking(false).map_err(|e| e.to_string())?;
    let _ = sock.set_nodelay(true);
    let mut sock = Sock::new(sock);
    let mut conn = ServerConnection::new(config).map_err(|e| e.to_string())?;
    conn.set_buffer_limit(Some(TLS_BUFFER));
    handshake(&mut conn, &mut sock, Instant::now() + HANDSHAKE_TIMEOUT)?;
    Ok(Channel::TlsServer(Box::new(StreamOwned::new(conn, sock))))
}

/// One end of a migration channel.
#[derive(Debug)]
pub(crate) enum Channel {
    /// On one host.
    Unix(UnixStream),
    /// The source's end of a TLS channel.
    TlsClient(Box<StreamOwned<ClientConnection, Sock>>),
    /// The target's end of a TLS channel.
    TlsServer(Box<StreamOwned<ServerConnection, Sock>>),
}

/// Shuts a channel's socket down from another thread (an interrupt), so a blocked read or
/// write returns.
#[derive(Debug)]
pub(crate) enum Shutter {
    /// A Unix socket's duplicate.
    Unix(UnixStream),
    /// A TCP socket's duplicate.
    Tcp(TcpStream),
}

impl Shutter {
    /// Shuts both directions down.
    pub(crate) fn shut(&self) {
        let _ = match self {
            Shutter::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Shutter::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Channel {
    /// Whether descriptors can travel on it (only on one host).
    pub(crate) fn passes_descriptors(&self) -> bool {
        matches!(self, Channel::Unix(_))
    }

    fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Channel::Unix(_) => None,
            Channel::TlsClient(s) => Some(s.get_ref().tcp()),
            Channel::TlsServer(s) => Some(s.get_ref().tcp()),
        }
    }

    /// Bounds every read (`None`: no bound).
    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match (self, self.tcp()) {
            (Channel::Unix(s), _) => s.set_read_timeout(t),
            (_, Some(s)) => s.set_read_timeout(t),
            _ => Ok(()),
        }
    }

    /// Bounds every write (`None`: no bound).
    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match (self, self.tcp()) {
            (Channel::Unix(s), _) => s.set_write_timeout(t),
            (_, Some(s)) => s.set_write_timeout(t),
            _ => Ok(()),
        }
    }

    /// A handle that shuts this channel down from another thread.
    pub(crate) fn shutter(&self) -> std::io::Result<Shutter> {
        match (self, self.tcp()) {
            (Channel::Unix(s), _) => Ok(Shutter::Unix(s.try_clone()?)),
            (_, Some(s)) => Ok(Shutter::Tcp(s.try_clone()?)),
            _ => Err(std::io::Error::other("no socket")),
        }
    }

    /// Reads at least one byte into `buf` (0: the peer closed), with the descriptor that came
    /// with them, if any (Unix only).
    pub(crate) fn read_with_fd(&mut self, buf: &mut [u8]) -> std::io::Result<(usize, Option<OwnedFd>)> {
        match self {
            // A signal that interrupts the wait is not an error: its handler shuts the
            // channel down if it means to end it.
            Channel::Unix(s) => loop {
                match s.recv_with_fd(buf) {
                    Ok((n, file)) => return Ok((n, file.map(OwnedFd::from))),
                    Err(e) if e.errno() == libc::EINTR => continue,
                    Err(e) => return Err(std::io::Error::from_raw_os_error(e.errno())),
                }
            },
            other => loop {
                match other.read(buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    r => return Ok((r?, None)),
                }
            },
        }
    }

    /// Sends `head` with descriptor `fd` attached, then `payload` (Unix only).
    pub(crate) fn write_with_fd(&mut self, head: &[u8], fd: std::os::fd::RawFd, payload: &[u8]) -> std::io::Result<()> {
        match self {
            Channel::Unix(s) => {
                s.send_with_fd(head, fd).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
                s.write_all(payload)
            }
            _ => Err(std::io::Error::other("descriptors cannot travel over TCP")),
        }
    }
}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Channel::Unix(s) => s.read(buf),
            Channel::TlsClient(s) => s.read(buf),
            Channel::TlsServer(s) => s.read(buf),
        }
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Channel::Unix(s) => s.write(buf),
            Channel::TlsClient(s) => s.write(buf),
            Channel::TlsServer(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Channel::Unix(s) => s.flush(),
            Channel::TlsClient(s) => s.flush(),
            Channel::TlsServer(s) => s.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> TlsFiles {
        TlsFiles { cert: "c".into(), key: "k".into(), ca: "a".into() }
    }

    #[test]
    fn destinations_parse_and_print() {
        assert_eq!(Destination::parse("unix:/tmp/m", None).unwrap(), Destination::Unix("/tmp/m".into()));
        let d = Destination::parse("tcp:10.0.0.2:7000", Some(files())).unwrap();
        assert_eq!(d, Destination::Tcp { host: "10.0.0.2".into(), port: 7000, tls: files() });
        assert_eq!(d.to_string(), "tcp:10.0.0.2:7000");
        let v6 = Destination::parse("tcp:[fd00::2]:7000", Some(files())).unwrap();
        assert_eq!(v6.to_string(), "tcp:[fd00::2]:7000");
        for bad in ["tcp:10.0.0.2", "tcp::7000", "tcp:h:0", "tcp:h:99999", "tcp:fd00::2:7000", "udp:h:1", "unix:"] {
            assert!(Destination::parse(bad, Some(files())).is_err(), "{bad}");
        }
        let e = Destination::parse("tcp:h:1", None).unwrap_err().to_string();
        assert!(e.contains("mutual TLS"), "{e}");
    }

    #[test]
    fn a_missing_file_is_named_in_the_order_cert_key_ca() {
        let e = TlsFiles { cert: "/nonexistent/c.pem".into(), ..files() }.server_config().unwrap_err().to_string();
        assert!(e.starts_with("--tls-cert /nonexistent/c.pem: "), "{e}");
        let e = TlsFiles { ca: "/nonexistent/ca.pem".into(), ..files() }.client_config().unwrap_err().to_string();
        assert!(e.starts_with("--tls-cert c: "), "{e}");
    }
}
