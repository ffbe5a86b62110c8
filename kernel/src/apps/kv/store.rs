//! The keyspace: binary keys to binary values with optional expiry deadlines.
//!
//! Keys live in a `BTreeMap<Box<[u8]>, Entry>`. For ~1M keys and a few hundred MB of values
//! this is the better fit over a hash table here:
//!
//! * it grows one node at a time — no rehash that moves every entry (tens of ms at 1M keys,
//!   with the old and new tables both alive) while the store's spin lock is held;
//! * per entry it costs the key and entry slots in a node (16 + 32 bytes, nodes about 2/3
//!   full: ~75 bytes) plus the key's and value's own allocations — about 20 bytes more than
//!   an open-addressing table at 7/8 load, which is small next to the allocations;
//! * dropping it frees every node (FLUSHALL keeps no capacity), and its order gives KEYS a
//!   stable order and the expiry index a cheap "earliest deadline" query.
//!
//! Lookups cost O(log n) key comparisons (~20 at 1M keys).
//!
//! Expiry: a key's deadline is an absolute time in the caller's milliseconds. Expired keys
//! are invisible to every read (and removed when touched); [`Store::sweep`] removes them in
//! deadline order with bounded work per call, through an index of (deadline, key) holding a
//! second copy of each volatile key.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;
use core::borrow::Borrow;
use core::cmp::Ordering;
use core::mem;
use core::num::NonZeroU64;

use super::types::Value;

/// A stored key's value and deadline.
#[derive(Debug)]
pub struct Entry {
    /// The value.
    pub value: Value,
    /// Deadline (caller's ms) after which the key is gone; `None` = persistent.
    due: Option<NonZeroU64>,
}

impl Entry {
    /// The deadline, if the key is volatile.
    pub fn due(&self) -> Option<u64> {
        self.due.map(NonZeroU64::get)
    }
}

/// What SET does with an existing deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    /// Make the key persistent.
    Clear,
    /// Keep the key's deadline (if it exists).
    Keep,
    /// Expire at this absolute time (ms, > 0).
    At(NonZeroU64),
}

/// Counters for INFO's `# Stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Commands run.
    pub commands: u64,
    /// Keys removed because their deadline passed.
    pub expired_keys: u64,
    /// Reads that found their key.
    pub hits: u64,
    /// Reads that did not.
    pub misses: u64,
}

/// An entry of the expiry index, ordered by deadline then key.
type Due = (u64, Box<[u8]>);

/// Borrowed view of a [`Due`], so the index can be searched without allocating a key.
trait DueKey {
    fn parts(&self) -> (u64, &[u8]);
}

impl DueKey for Due {
    fn parts(&self) -> (u64, &[u8]) {
        (self.0, &self.1)
    }
}

impl DueKey for (u64, &[u8]) {
    fn parts(&self) -> (u64, &[u8]) {
        *self
    }
}

impl<'a> Borrow<dyn DueKey + 'a> for Due {
    fn borrow(&self) -> &(dyn DueKey + 'a) {
        self
    }
}

impl PartialEq for dyn DueKey + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn DueKey + '_ {}

impl PartialOrd for dyn DueKey + '_ {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for dyn DueKey + '_ {
    // Same order as the tuple `(u64, Box<[u8]>)`: deadline, then key bytes.
    fn cmp(&self, other: &Self) -> Ordering {
        self.parts().cmp(&other.parts())
    }
}

/// A keyspace taken out of a [`Store`] by [`Store::detach`]; dropping it frees its memory.
#[derive(Debug, Default)]
pub struct Detached {
    map: BTreeMap<Box<[u8]>, Entry>,
    /// Kept only to be freed with the rest.
    #[allow(dead_code)]
    index: BTreeSet<Due>,
}

#[cfg_attr(not(test), allow(dead_code))] // part of the core's API; the tests use it
impl Detached {
    /// Keys it holds.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether it holds no key.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The key-value store.
#[derive(Debug)]
pub struct Store {
    map: BTreeMap<Box<[u8]>, Entry>,
    /// (deadline, key) of every volatile key.
    index: BTreeSet<Due>,
    /// Sum of key and value lengths.
    bytes: usize,
    /// Sum of the deadlines in `index` (for the average TTL).
    due_sum: u128,
    stats: Stats,
    /// State of the generator SPOP draws from (xorshift64*).
    rng: u64,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    /// An empty store.
    pub const fn new() -> Self {
        Self {
            map: BTreeMap::new(),
            index: BTreeSet::new(),
            bytes: 0,
            due_sum: 0,
            stats: Stats::zero(),
            rng: 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// Keys held, including expired ones not removed yet (as Redis's DBSIZE).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Keys with a deadline.
    pub fn volatile_len(&self) -> usize {
        self.index.len()
    }

    /// Bytes of keys plus values held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// A pseudo-random number below `n` (`n > 0`), for SPOP.
    pub fn random_below(&mut self, n: usize) -> usize {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1) as u64) as usize
    }

    /// Counts one command.
    pub fn count_command(&mut self) {
        self.stats.commands += 1;
    }

    /// Average time to live of the volatile keys at `now` (0 if none).
    pub fn avg_ttl_ms(&self, now: u64) -> u64 {
        match self.index.len() as u128 {
            0 => 0,
            n => (self.due_sum / n).saturating_sub(u128::from(now)) as u64,
        }
    }

    /// Removes `key` if its deadline has passed; true if it did.
    fn expire_if_due(&mut self, key: &[u8], now: u64) -> bool {
        // Nothing can be due unless the earliest deadline is.
        if self.index.first().is_none_or(|(d, _)| *d > now) {
            return false;
        }
        if self.map.get(key).and_then(Entry::due).is_some_and(|d| d <= now) {
            self.remove(key);
            self.stats.expired_keys += 1;
            return true;
        }
        false
    }

    /// The live entry for `key` (expiring it first if due), counting a hit or miss.
    pub fn read(&mut self, key: &[u8], now: u64) -> Option<&Entry> {
        self.expire_if_due(key, now);
        let e = self.map.get(key);
        if e.is_some() {
            self.stats.hits += 1;
        } else {
            self.stats.misses += 1;
        }
        e
    }

    /// The live entry for `key` without counting it (existence checks, TTL).
    pub fn peek(&mut self, key: &[u8], now: u64) -> Option<&Entry> {
        self.expire_if_due(key, now);
        self.map.get(key)
    }

    /// Stores the string `value` under `key` with the deadline policy `ttl`, replacing any
    /// value.
    pub fn set(&mut self, key: Vec<u8>, mut value: Vec<u8>, ttl: Ttl, now: u64) {
        value.shrink_to_fit();
        self.set_value(key, Value::Str(value), ttl, now);
    }

    /// Stores `value` under `key` with the deadline policy `ttl`, replacing any value.
    pub fn set_value(&mut self, key: Vec<u8>, value: Value, ttl: Ttl, now: u64) {
        self.expire_if_due(&key, now);
        if let Some(e) = self.map.get_mut(&key[..]) {
            self.bytes = self.bytes - e.value.weight() + value.weight();
            e.value = value;
            let old = e.due;
            match ttl {
                Ttl::Keep => {}
                Ttl::Clear => self.set_due(&key, old, None),
                Ttl::At(d) => self.set_due(&key, old, Some(d)),
            }
            return;
        }
        let key = key.into_boxed_slice();
        self.bytes += key.len() + value.weight();
        let due = match ttl {
            Ttl::At(d) => Some(d),
            Ttl::Keep | Ttl::Clear => None,
        };
        if let Some(d) = due {
            self.index.insert((d.get(), key.clone()));
            self.due_sum += u128::from(d.get());
        }
        self.map.insert(key, Entry { value, due });
    }

    /// Changes the live `key`'s value in place (keeping its deadline); `f` gets the value.
    /// Returns `None` if the key does not exist. A collection left empty is removed with its
    /// key, as Redis does.
    pub fn update<R>(&mut self, key: &[u8], now: u64, f: impl FnOnce(&mut Value) -> R) -> Option<R> {
        self.expire_if_due(key, now);
        let e = self.map.get_mut(key)?;
        let before = e.value.weight();
        let r = f(&mut e.value);
        self.bytes = self.bytes - before + e.value.weight();
        if e.value.is_empty_collection() {
            self.remove(key);
        }
        Some(r)
    }

    /// Sets or clears the deadline of an existing `key` whose current one is `old`.
    fn set_due(&mut self, key: &[u8], old: Option<NonZeroU64>, new: Option<NonZeroU64>) {
        if old == new {
            return;
        }
        if let Some(o) = old {
            self.index.remove(&(o.get(), key) as &dyn DueKey);
            self.due_sum -= u128::from(o.get());
        }
        if let Some(n) = new {
            self.index.insert((n.get(), Box::from(key)));
            self.due_sum += u128::from(n.get());
        }
        if let Some(e) = self.map.get_mut(key) {
            e.due = new;
        }
    }

    /// Gives the live `key` the deadline `due` (or makes it persistent with `None`); false if
    /// the key does not exist.
    pub fn expire_at(&mut self, key: &[u8], due: Option<NonZeroU64>, now: u64) -> bool {
        self.expire_if_due(key, now);
        let Some(old) = self.map.get(key).map(|e| e.due) else { return false };
        self.set_due(key, old, due);
        true
    }

    /// Removes `key` (live or not), freeing its value; true if it was there.
    pub fn remove(&mut self, key: &[u8]) -> bool {
        let Some((k, e)) = self.map.remove_entry(key) else { return false };
        self.bytes -= k.len() + e.value.weight();
        if let Some(d) = e.due {
            self.index.remove(&(d.get(), key) as &dyn DueKey);
            self.due_sum -= u128::from(d.get());
        }
        true
    }

    /// Removes the live `key` and returns its value.
    pub fn take(&mut self, key: &[u8], now: u64) -> Option<Value> {
        self.expire_if_due(key, now);
        let (k, e) = self.map.remove_entry(key)?;
        self.bytes -= k.len() + e.value.weight();
        if let Some(d) = e.due {
            self.index.remove(&(d.get(), key) as &dyn DueKey);
            self.due_sum -= u128::from(d.get());
        }
        Some(e.value)
    }

    /// Empties the store, keeping no capacity, and hands back the old keys and values: dropping
    /// the [`Detached`] frees them (O(n): ~0.2 s for 1M keys on the host), so the caller can do
    /// it after releasing the store's lock.
    pub fn detach(&mut self) -> Detached {
        self.bytes = 0;
        self.due_sum = 0;
        Detached { map: mem::take(&mut self.map), index: mem::take(&mut self.index) }
    }

    #[cfg_attr(not(test), allow(dead_code))] // part of the core's API; the tests use it
    /// Drops every key and frees all the memory the store held, now.
    pub fn flush(&mut self) {
        drop(self.detach());
    }

    /// Removes up to `max` keys whose deadline is at or before `now`, earliest first; returns
    /// how many it removed. Each removal is O(log n).
    pub fn sweep(&mut self, now: u64, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            match self.index.first() {
                Some((d, _)) if *d <= now => {}
                _ => break,
            }
            let Some((d, key)) = self.index.pop_first() else { break };
            self.due_sum -= u128::from(d);
            if let Some((k, e)) = self.map.remove_entry(&key) {
                self.bytes -= k.len() + e.value.weight();
            }
            self.stats.expired_keys += 1;
            n += 1;
        }
        n
    }

    /// Live keys (not yet expired at `now`), in key order.
    pub fn live_keys(&self, now: u64) -> impl Iterator<Item = &[u8]> {
        self.map.iter().filter(move |(_, e)| e.due().is_none_or(|d| d > now)).map(|(k, _)| &k[..])
    }
}

impl Stats {
    const fn zero() -> Self {
        Self { commands: 0, expired_keys: 0, hits: 0, misses: 0 }
    }
}
