//! Shims the tools start as child processes.

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Waits (at most `within`) until the guest service of `child`, a shim started with its
/// standard output piped, prints that it listens; the child is killed when it does not.
pub fn wait_until_listening(child: &mut Child, within: Duration) -> Result<(), String> {
    let out = child.stdout.take().ok_or("the shim's standard output is not piped")?;
    let (tx, rx) = mpsc::channel();
    // The reader drains the console for the rest of the child's life, so it never blocks on a
    // full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + within;
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) if l.contains("listening on vsock port") => return Ok(()),
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                return Err("the service did not start listening".into());
            }
        }
    }
}
