//! The client of `hypervisor-shim`'s control API (`run --api-sock PATH`, `docs/api.yaml`):
//! HTTP/1.1 and JSON on a Unix socket. One call is one connection: [`request`] writes the
//! request, reads the whole answer (at most 64 MiB), parses it with `httparse` and returns
//! the body of a 2xx answer, or the API's own one-line `error` for any other.
//!
//! Its users: `hypervisor-shim ctl` (a command-line client) and the containerd shim (Update,
//! Stats, Pause, Checkpoint of a task), which would otherwise start a `ctl` process per call.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use thiserror::Error;

/// Largest answer read.
const MAX_ANSWER: u64 = 64 << 20;

/// Why a request got no 2xx answer.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Nothing serves the socket.
    #[error("cannot reach the control API at {path}: {reason}")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        reason: String,
        /// Nobody serves it: the socket does not exist, or nothing listens on it (not a
        /// permission or a resource problem of the client's).
        nobody: bool,
    },
    /// The exchange failed midway, took too long, or the answer is not HTTP.
    #[error("control API at {path}: {reason}")]
    Protocol {
        /// The socket.
        path: String,
        /// Why.
        reason: String,
    },
    /// The API refused the request.
    #[error("{message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The API's message.
        message: String,
    },
}

/// One request on the API at `sock`: `method` (`GET`, `PUT`), `path` (`/api/v1/vms/vm0`) and a
/// JSON `body` (may be empty); waits at most `timeout` for the answer. Returns the body of a
/// 2xx answer.
pub fn request(sock: &Path, method: &str, path: &str, body: &str, timeout: Duration) -> Result<String, ClientError> {
    let shown = sock.display().to_string();
    let mut s = UnixStream::connect(sock).map_err(|e| ClientError::Connect {
        path: shown.clone(),
        reason: e.to_string(),
        nobody: matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused),
    })?;
    let proto = |reason: String| ClientError::Protocol { path: shown.clone(), reason };
    let _ = s.set_read_timeout(Some(timeout));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).and_then(|_| s.write_all(body.as_bytes())).map_err(|e| proto(e.to_string()))?;
    let mut raw = Vec::new();
    s.take(MAX_ANSWER).read_to_end(&mut raw).map_err(|e| proto(e.to_string()))?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let at = match resp.parse(&raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(proto("the answer ended early".into())),
        Err(e) => return Err(proto(format!("not an HTTP answer: {e}"))),
    };
    let status = resp.code.unwrap_or(0);
    let text = String::from_utf8_lossy(&raw[at..]).into_owned();
    if (200..300).contains(&status) {
        return Ok(text);
    }
    let message = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("HTTP {status}: {}", text.trim()));
    Err(ClientError::Refused { status, message })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// Serves one connection with `answer` and returns what the client sent.
    fn serve_once(answer: &'static [u8]) -> (std::path::PathBuf, std::thread::JoinHandle<Vec<u8>>) {
        let dir = std::env::temp_dir().join(format!("control-client-{}-{}", std::process::id(), answer.len()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let sock = dir.join("api.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        let h = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().expect("accept");
            let mut got = vec![0u8; 4096];
            let n = c.read(&mut got).expect("read");
            got.truncate(n);
            c.write_all(answer).expect("answer");
            got
        });
        (sock, h)
    }

    #[test]
    fn an_answer_and_a_refusal() {
        let (sock, h) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"vcpus\":1}");
        let body = request(&sock, "PUT", "/api/v1/vms/vm0/policy", "{}", Duration::from_secs(5)).expect("2xx");
        assert_eq!(body, "{\"vcpus\":1}");
        let sent = String::from_utf8(h.join().expect("server")).expect("utf-8");
        assert!(sent.starts_with("PUT /api/v1/vms/vm0/policy HTTP/1.1\r\n"), "{sent}");
        assert!(sent.ends_with("Content-Length: 2\r\n\r\n{}"), "{sent}");

        let (sock, _h) = serve_once(b"HTTP/1.1 409 Conflict\r\n\r\n{\"error\": \"vm0 is not paused\"}");
        let e = request(&sock, "PUT", "/x", "", Duration::from_secs(5)).expect_err("409");
        assert!(matches!(&e, ClientError::Refused { status: 409, message } if message == "vm0 is not paused"), "{e}");

        let (sock, _h) = serve_once(b"garbage");
        assert!(matches!(request(&sock, "GET", "/", "", Duration::from_secs(5)), Err(ClientError::Protocol { .. })));
        let e = request(Path::new("/nonexistent/api.sock"), "GET", "/", "", Duration::from_secs(5)).expect_err("none");
        assert!(matches!(e, ClientError::Connect { nobody: true, .. }), "{e}");
    }
}
