//! The `kv` protocol: a mix of Redis `SET` and `GET` over RESP2, every answer verified.
//!
//! Keys are `loadgen:RUN:K` for `K` in `0..keys`, where `RUN` is a random id per run, so two
//! generators (or an earlier run) never share a key. Key `K` belongs to connection
//! `K % connections` and only that connection touches it, so the generator always knows the
//! value a correct service holds: the value is derived from the run, the key and a per-key
//! version that each successful `SET` advances ([`value`]).
//!
//! Each request picks one of the connection's keys uniformly; it is a `SET` with probability
//! `set_ratio` (else a `GET`). `SET` must answer `+OK`; `GET` must answer exactly the bytes of
//! the key's current version. When a `SET`'s outcome is unknown (no answer, a wrong answer)
//! the key is marked uncertain and its next request is a `SET`, which makes it known again:
//! a `GET` is only ever checked against a value the service acknowledged.
//!
//! Before the measured phase every key is written once (pipelined, in batches), so `GET`s
//! have something to check from the first second.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::Verdict;
use super::conn::{Conn, ConnError};
use super::resp::{self, Reply};
use super::rng::SplitMix64;

/// Largest answer accepted: the largest value plus framing.
const MAX_ANSWER: usize = (super::MAX_VALUE_SIZE as usize) + 1024;
/// Keys written per round trip while populating: up to 128, and about 256 KiB of values.
fn populate_batch(value_size: usize) -> usize {
    ((256 << 10) / value_size.max(1)).clamp(1, 128)
}

/// Options of the `kv` protocol.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KvOptions {
    /// Number of keys, shared out among the connections (at least one per connection).
    pub keys: u32,
    /// Bytes per value.
    pub value_size: u32,
    /// Fraction of requests that are `SET` (the rest are `GET`), in `0..=1`.
    pub set_ratio: f64,
}

impl Default for KvOptions {
    fn default() -> Self {
        KvOptions { keys: 1000, value_size: 64, set_ratio: 0.5 }
    }
}

/// One key this connection owns.
#[derive(Debug)]
struct Key {
    name: Vec<u8>,
    index: u64,
    /// The version the service holds (if not `uncertain`).
    version: u64,
    /// The last `SET`'s outcome is unknown: the next request must be a `SET`.
    uncertain: bool,
}

/// The `kv` client state of one connection.
#[derive(Debug)]
pub(crate) struct KvClient {
    run: u64,
    value_size: usize,
    set_ratio: f64,
    keys: Vec<Key>,
    rng: SplitMix64,
    out: Vec<u8>,
}

/// The value of key `index`, version `version`, in run `run`: `size` letters and digits drawn
/// from a generator seeded by all three.
pub fn value(run: u64, index: u64, version: u64, size: usize) -> Vec<u8> {
    const ALPHABET: &[u8; 62] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = SplitMix64::new(run ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ version.rotate_left(32));
    let mut v = Vec::with_capacity(size);
    while v.len() < size {
        let mut word = rng.next_u64();
        for _ in 0..8 {
            if v.len() == size {
                break;
            }
            v.push(ALPHABET[(word % 62) as usize]);
            word /= 62;
        }
    }
    v
}

impl KvClient {
    /// The client of connection `conn` out of `connections`.
    pub fn new(options: &KvOptions, run: u64, conn: usize, connections: usize) -> Self {
        let keys = (conn as u64..options.keys as u64)
            .step_by(connections.max(1))
            .map(|index| Key {
                name: format!("loadgen:{run:016x}:{index}").into_bytes(),
                index,
                version: 0,
                uncertain: true,
            })
            .collect();
        KvClient {
            run,
            value_size: options.value_size as usize,
            set_ratio: options.set_ratio,
            keys,
            rng: SplitMix64::new(run ^ (conn as u64).wrapping_add(1).wrapping_mul(0xD1B5_4A32_D192_ED03)),
            out: Vec::new(),
        }
    }

    /// How many keys this connection owns.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Writes every key once (version 0), pipelined ([`populate_batch`] per round trip). Returns the number
    /// written and the failures (a key that failed stays uncertain, so the measured phase
    /// writes it before reading it). A connection error stops the population.
    pub fn populate(&mut self, conn: &mut Conn, timeout: Duration) -> (u64, Vec<String>, Option<ConnError>) {
        let mut written = 0;
        let mut failures = Vec::new();
        let per_batch = populate_batch(self.value_size);
        for first in (0..self.keys.len()).step_by(per_batch) {
            let batch = first..(first + per_batch).min(self.keys.len());
            self.out.clear();
            for key in &self.keys[batch.clone()] {
                let v = value(self.run, key.index, 0, self.value_size);
                resp::command(&mut self.out, &[b"SET", &key.name, &v]);
            }
            if let Err(e) = conn.send(&self.out) {
                return (written, failures, Some(e));
            }
            let deadline = Instant::now() + timeout;
            for key in &mut self.keys[batch] {
                match conn.read_frame(deadline, MAX_ANSWER, resp::parse) {
                    Ok(Reply::Simple(ok)) if ok == b"OK" => {
                        key.version = 0;
                        key.uncertain = false;
                        written += 1;
                    }
                    Ok(other) => failures.push(format!(
                        "SET {} answered {} while populating, expected +OK",
                        String::from_utf8_lossy(&key.name),
                        other.describe()
                    )),
                    Err(e) => return (written, failures, Some(e)),
                }
            }
        }
        (written, failures, None)
    }

    /// Sends one request on `conn` and verifies its answer. A [`ConnError`] means the
    /// connection must be dropped.
    pub fn request(&mut self, conn: &mut Conn, timeout: Duration) -> Result<Verdict, ConnError> {
        if self.keys.is_empty() {
            return Ok(Verdict::Wrong("this connection owns no key (fewer keys than connections)".into()));
        }
        let k = (self.rng.next_u64() % self.keys.len() as u64) as usize;
        let is_set = self.keys[k].uncertain || self.rng.next_f64() < self.set_ratio;
        let key = &mut self.keys[k];
        self.out.clear();
        if is_set {
            let version = key.version + 1;
            let v = value(self.run, key.index, version, self.value_size);
            resp::command(&mut self.out, &[b"SET", &key.name, &v]);
            // Until +OK arrives the service may hold either version.
            key.uncertain = true;
            key.version = version;
            conn.send(&self.out)?;
            let reply = conn.read_frame(Instant::now() + timeout, MAX_ANSWER, resp::parse)?;
            Ok(match reply {
                Reply::Simple(ok) if ok == b"OK" => {
                    key.uncertain = false;
                    Verdict::Ok
                }
                other => Verdict::Wrong(format!(
                    "SET {} answered {}, expected +OK",
                    String::from_utf8_lossy(&key.name),
                    other.describe()
                )),
            })
        } else {
            resp::command(&mut self.out, &[b"GET", &key.name]);
            conn.send(&self.out)?;
            let reply = conn.read_frame(Instant::now() + timeout, MAX_ANSWER, resp::parse)?;
            let expected = value(self.run, key.index, key.version, self.value_size);
            Ok(match reply {
                Reply::Bulk(Some(got)) if got == expected => Verdict::Ok,
                other => Verdict::Wrong(format!(
                    "GET {} answered {}, expected the {}-byte value of version {}",
                    String::from_utf8_lossy(&key.name),
                    other.describe(),
                    self.value_size,
                    key.version
                )),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_deterministic_and_distinct() {
        let a = value(7, 3, 1, 64);
        assert_eq!(a.len(), 64);
        assert_eq!(a, value(7, 3, 1, 64));
        assert!(a.iter().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(a, value(7, 3, 2, 64), "versions differ");
        assert_ne!(a, value(7, 4, 1, 64), "keys differ");
        assert_ne!(a, value(8, 3, 1, 64), "runs differ");
        assert_eq!(value(1, 2, 3, 0), b"");
        assert_eq!(value(1, 2, 3, 13).len(), 13);
    }

    #[test]
    fn keys_are_shared_out_among_connections() {
        let opts = KvOptions { keys: 10, ..KvOptions::default() };
        let owned: Vec<Vec<u64>> =
            (0..3).map(|c| KvClient::new(&opts, 1, c, 3).keys.iter().map(|k| k.index).collect()).collect();
        assert_eq!(owned, [vec![0, 3, 6, 9], vec![1, 4, 7], vec![2, 5, 8]]);
        let c = KvClient::new(&opts, 0xab, 1, 3);
        assert_eq!(c.keys[0].name, b"loadgen:00000000000000ab:1");
        assert!(c.keys.iter().all(|k| k.uncertain), "unknown until populated");
    }

    #[test]
    fn population_batches_stay_small() {
        assert_eq!(populate_batch(64), 128);
        assert_eq!(populate_batch(4096), 64);
        assert_eq!(populate_batch(1 << 20), 1);
    }
}
