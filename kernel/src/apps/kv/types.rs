//! The value types a key can hold: strings, lists, hashes, sets and sorted sets.
//!
//! Each collection keeps a running count of its element bytes, so the store's accounting
//! ([`Value::weight`]) is O(1) after any change. Orders follow Redis 7.0 where Redis's is
//! deterministic, so replies match byte for byte:
//!
//! * a hash keeps insertion order while it is small (Redis's listpack: at most
//!   [`HASH_SMALL_ENTRIES`] fields, none longer than [`HASH_SMALL_VALUE`]); past that it is a
//!   `BTreeMap` (Redis's hash table order is unspecified);
//! * a set of integers is kept sorted while it has at most [`SET_INT_ENTRIES`] members
//!   (Redis's intset); otherwise it is a `BTreeSet` of byte strings;
//! * a sorted set is ordered by (score, member), as Redis's.
//!
//! Empty collections are never stored: the commands remove a key whose collection empties.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::vec::Vec;
use core::cmp::Ordering;

use super::resp::{parse_i64, push_decimal};

/// Most fields a hash keeps in insertion order (Redis's `hash-max-listpack-entries`).
pub const HASH_SMALL_ENTRIES: usize = 512;
/// Longest field or value a hash keeps in insertion order (`hash-max-listpack-value`).
pub const HASH_SMALL_VALUE: usize = 64;
/// Most members a set of integers keeps sorted numerically (`set-max-intset-entries`).
pub const SET_INT_ENTRIES: usize = 512;

/// Bytes charged per element beyond its own bytes (its allocation header and slot).
const ELEMENT_OVERHEAD: usize = 24;

/// A stored value.
#[derive(Debug)]
pub enum Value {
    /// A binary string.
    Str(Vec<u8>),
    /// A list.
    List(List),
    /// A hash of fields to values.
    Hash(Hash),
    /// A set of members.
    Set(Set),
    /// A sorted set.
    ZSet(ZSet),
}

impl Value {
    /// TYPE's answer.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Str(_) => "string",
            Self::List(_) => "list",
            Self::Hash(_) => "hash",
            Self::Set(_) => "set",
            Self::ZSet(_) => "zset",
        }
    }

    /// Bytes charged to the store for this value.
    pub fn weight(&self) -> usize {
        match self {
            Self::Str(v) => v.len(),
            Self::List(l) => l.bytes,
            Self::Hash(h) => h.bytes,
            Self::Set(s) => s.bytes,
            Self::ZSet(z) => z.bytes,
        }
    }

    /// A collection with no element left (to be removed from the keyspace).
    pub fn is_empty_collection(&self) -> bool {
        match self {
            Self::Str(_) => false,
            Self::List(l) => l.items.is_empty(),
            Self::Hash(h) => h.len() == 0,
            Self::Set(s) => s.len() == 0,
            Self::ZSet(z) => z.len() == 0,
        }
    }
}

fn charge(v: &[u8]) -> usize {
    v.len() + ELEMENT_OVERHEAD
}

/// A list of byte strings.
#[derive(Debug, Default)]
pub struct List {
    items: VecDeque<Vec<u8>>,
    bytes: usize,
}

impl List {
    /// Elements.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Adds at the head (`left`) or tail.
    pub fn push(&mut self, v: Vec<u8>, left: bool) {
        self.bytes += charge(&v);
        if left { self.items.push_front(v) } else { self.items.push_back(v) }
    }

    /// Takes from the head (`left`) or tail.
    pub fn pop(&mut self, left: bool) -> Option<Vec<u8>> {
        let v = if left { self.items.pop_front() } else { self.items.pop_back() }?;
        self.bytes -= charge(&v);
        Some(v)
    }

    /// Element `i` from the head.
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        self.items.get(i).map(|v| &v[..])
    }

    /// Replaces element `i`; false if out of range.
    pub fn set(&mut self, i: usize, v: Vec<u8>) -> bool {
        let Some(slot) = self.items.get_mut(i) else { return false };
        self.bytes = self.bytes - charge(slot) + charge(&v);
        *slot = v;
        true
    }

    /// Elements `start..=end` (already clamped to the list).
    pub fn range(&self, start: usize, end: usize) -> impl Iterator<Item = &[u8]> {
        self.items.range(start..=end).map(|v| &v[..])
    }

    /// Keeps only `start..=end`, or nothing when `keep` is false.
    pub fn trim(&mut self, start: usize, end: usize, keep: bool) {
        if !keep {
            self.items.clear();
            self.bytes = 0;
            return;
        }
        self.items.truncate(end + 1);
        for _ in 0..start {
            self.pop(true);
        }
        self.bytes = self.items.iter().map(|v| charge(v)).sum();
    }

    /// LREM: removes up to `count` elements equal to `v` from the head (`count > 0`), the
    /// tail (`count < 0`) or all of them (`count == 0`); returns how many.
    pub fn remove(&mut self, v: &[u8], count: i64) -> usize {
        let limit = if count == 0 { usize::MAX } else { usize::try_from(count.unsigned_abs()).unwrap_or(usize::MAX) };
        let mut removed = 0;
        if count >= 0 {
            let mut i = 0;
            while i < self.items.len() && removed < limit {
                if self.items.get(i).is_some_and(|x| x[..] == *v) {
                    self.items.remove(i);
                    removed += 1;
                } else {
                    i += 1;
                }
            }
        } else {
            let mut i = self.items.len();
            while i > 0 && removed < limit {
                i -= 1;
                if self.items.get(i).is_some_and(|x| x[..] == *v) {
                    self.items.remove(i);
                    removed += 1;
                }
            }
        }
        self.bytes -= removed * charge(v);
        removed
    }
}

/// A hash: field → value.
#[derive(Debug)]
pub struct Hash {
    repr: HashRepr,
    bytes: usize,
}

#[derive(Debug)]
enum HashRepr {
    /// Insertion order (Redis's listpack encoding).
    Small(Vec<(Vec<u8>, Vec<u8>)>),
    Big(BTreeMap<Vec<u8>, Vec<u8>>),
}

impl Default for Hash {
    fn default() -> Self {
        Self { repr: HashRepr::Small(Vec::new()), bytes: 0 }
    }
}

impl Hash {
    /// Fields.
    pub fn len(&self) -> usize {
        match &self.repr {
            HashRepr::Small(v) => v.len(),
            HashRepr::Big(m) => m.len(),
        }
    }

    /// The value of `field`.
    pub fn get(&self, field: &[u8]) -> Option<&[u8]> {
        match &self.repr {
            HashRepr::Small(v) => v.iter().find(|(f, _)| f[..] == *field).map(|(_, v)| &v[..]),
            HashRepr::Big(m) => m.get(field).map(|v| &v[..]),
        }
    }

    /// Sets `field` to `value`; true if the field is new.
    pub fn insert(&mut self, field: Vec<u8>, value: Vec<u8>) -> bool {
        if let HashRepr::Small(v) = &mut self.repr {
            let long = field.len() > HASH_SMALL_VALUE || value.len() > HASH_SMALL_VALUE;
            let grows = !v.iter().any(|(f, _)| *f == field);
            if long || (grows && v.len() >= HASH_SMALL_ENTRIES) {
                let big = core::mem::take(v).into_iter().collect();
                self.repr = HashRepr::Big(big);
            }
        }
        let add = field.len() + value.len() + 2 * ELEMENT_OVERHEAD;
        let old = match &mut self.repr {
            HashRepr::Small(v) => match v.iter_mut().find(|(f, _)| *f == field) {
                Some((f, slot)) => Some((f.len(), core::mem::replace(slot, value))),
                None => {
                    v.push((field, value));
                    None
                }
            },
            HashRepr::Big(m) => {
                let flen = field.len();
                m.insert(field, value).map(|old| (flen, old))
            }
        };
        self.bytes += add;
        match old {
            Some((flen, v)) => {
                self.bytes -= flen + v.len() + 2 * ELEMENT_OVERHEAD;
                false
            }
            None => true,
        }
    }

    /// Removes `field`; true if it was there.
    pub fn remove(&mut self, field: &[u8]) -> bool {
        let gone = match &mut self.repr {
            HashRepr::Small(v) => v.iter().position(|(f, _)| f[..] == *field).map(|i| v.remove(i)),
            HashRepr::Big(m) => m.remove_entry(field),
        };
        match gone {
            Some((f, v)) => {
                self.bytes -= f.len() + v.len() + 2 * ELEMENT_OVERHEAD;
                true
            }
            None => false,
        }
    }

    /// Every (field, value), in Redis's order for a small hash.
    pub fn pairs(&self) -> Vec<(&[u8], &[u8])> {
        match &self.repr {
            HashRepr::Small(v) => v.iter().map(|(f, x)| (&f[..], &x[..])).collect(),
            HashRepr::Big(m) => m.iter().map(|(f, x)| (&f[..], &x[..])).collect(),
        }
    }
}

/// A set of byte strings.
#[derive(Debug)]
pub struct Set {
    repr: SetRepr,
    bytes: usize,
}

#[derive(Debug)]
enum SetRepr {
    /// Members that are all integers, sorted (Redis's intset encoding).
    Ints(Vec<i64>),
    Strs(BTreeSet<Vec<u8>>),
}

impl Default for Set {
    fn default() -> Self {
        Self { repr: SetRepr::Ints(Vec::new()), bytes: 0 }
    }
}

fn decimal(n: i64) -> Vec<u8> {
    let mut v = Vec::with_capacity(20);
    push_decimal(&mut v, n);
    v
}

impl Set {
    /// Members.
    pub fn len(&self) -> usize {
        match &self.repr {
            SetRepr::Ints(v) => v.len(),
            SetRepr::Strs(s) => s.len(),
        }
    }

    fn make_strs(&mut self) {
        if let SetRepr::Ints(v) = &self.repr {
            let strs = v.iter().map(|&n| decimal(n)).collect();
            self.repr = SetRepr::Strs(strs);
        }
    }

    /// Adds `m`; true if it is new.
    pub fn insert(&mut self, m: Vec<u8>) -> bool {
        if let SetRepr::Ints(v) = &mut self.repr {
            if let Some(n) = parse_i64(&m) {
                match v.binary_search(&n) {
                    Ok(_) => return false,
                    Err(i) => v.insert(i, n),
                }
                self.bytes += charge(&m);
                if v.len() > SET_INT_ENTRIES {
                    self.make_strs();
                }
                return true;
            }
            self.make_strs();
        }
        let add = charge(&m);
        let SetRepr::Strs(s) = &mut self.repr else { return false };
        let new = s.insert(m);
        if new {
            self.bytes += add;
        }
        new
    }

    /// Whether `m` is a member.
    pub fn contains(&self, m: &[u8]) -> bool {
        match &self.repr {
            SetRepr::Ints(v) => parse_i64(m).is_some_and(|n| v.binary_search(&n).is_ok()),
            SetRepr::Strs(s) => s.contains(m),
        }
    }

    /// Removes `m`; true if it was a member.
    pub fn remove(&mut self, m: &[u8]) -> bool {
        let gone = match &mut self.repr {
            SetRepr::Ints(v) => match parse_i64(m).map(|n| v.binary_search(&n)) {
                Some(Ok(i)) => {
                    v.remove(i);
                    true
                }
                _ => false,
            },
            SetRepr::Strs(s) => s.remove(m),
        };
        if gone {
            self.bytes -= charge(m);
        }
        gone
    }

    /// Calls `f` with every member (integers in ascending order, as Redis's intset), without
    /// copying the set.
    pub fn each_member(&self, mut f: impl FnMut(&[u8])) {
        match &self.repr {
            SetRepr::Ints(v) => {
                let mut text = Vec::with_capacity(20);
                for &n in v {
                    text.clear();
                    push_decimal(&mut text, n);
                    f(&text);
                }
            }
            SetRepr::Strs(s) => s.iter().for_each(|m| f(m)),
        }
    }

    /// Bytes charged for the set (its members plus a per-member overhead): an upper bound on
    /// its members' bytes.
    pub fn weight(&self) -> usize {
        self.bytes
    }

    /// Removes and returns the member at position `i` (`i < len`).
    pub fn take_nth(&mut self, i: usize) -> Option<Vec<u8>> {
        let m = match &mut self.repr {
            SetRepr::Ints(v) => (i < v.len()).then(|| decimal(v.remove(i))),
            SetRepr::Strs(s) => {
                let m = s.iter().nth(i).cloned();
                if let Some(m) = &m {
                    s.remove(m);
                }
                m
            }
        }?;
        self.bytes -= charge(&m);
        Some(m)
    }
}

/// A sorted-set score: never NaN, ordered as Redis compares them (-0 equals 0).
#[derive(Debug, Clone, Copy)]
pub struct Score(pub f64);

impl PartialEq for Score {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Score {}

impl PartialOrd for Score {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Score {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.partial_cmp(&other.0).unwrap_or(Ordering::Equal)
    }
}

/// A sorted set: members with scores, ordered by (score, member).
#[derive(Debug, Default)]
pub struct ZSet {
    scores: BTreeMap<Vec<u8>, f64>,
    order: BTreeSet<(Score, Vec<u8>)>,
    bytes: usize,
}

impl ZSet {
    /// Members.
    pub fn len(&self) -> usize {
        self.scores.len()
    }

    /// The score of `m`.
    pub fn score(&self, m: &[u8]) -> Option<f64> {
        self.scores.get(m).copied()
    }

    /// Sets the score of `m` (adding it if new); true if it is new.
    pub fn insert(&mut self, m: Vec<u8>, score: f64) -> bool {
        match self.scores.get_mut(&m) {
            Some(old) => {
                if *old != score || old.is_sign_negative() != score.is_sign_negative() {
                    let prev = core::mem::replace(old, score);
                    self.order.remove(&(Score(prev), m.clone()));
                    self.order.insert((Score(score), m));
                }
                false
            }
            None => {
                self.bytes += 2 * charge(&m) + 16;
                self.scores.insert(m.clone(), score);
                self.order.insert((Score(score), m));
                true
            }
        }
    }

    /// Removes `m`; true if it was a member.
    pub fn remove(&mut self, m: &[u8]) -> bool {
        let Some((k, s)) = self.scores.remove_entry(m) else { return false };
        self.order.remove(&(Score(s), k));
        self.bytes -= 2 * charge(m) + 16;
        true
    }

    /// The 0-based rank of `m` in ascending order.
    pub fn rank(&self, m: &[u8]) -> Option<usize> {
        let s = self.score(m)?;
        Some(self.order.range(..(Score(s), m.to_vec())).count())
    }

    /// Members with scores at ranks `start..=end` (clamped), ascending or, if `rev`, from the
    /// highest.
    pub fn range(&self, start: usize, end: usize, rev: bool) -> Vec<(&[u8], f64)> {
        let n = end + 1 - start;
        fn pick((s, m): &(Score, Vec<u8>)) -> (&[u8], f64) {
            (m, s.0)
        }
        if rev {
            self.order.iter().rev().skip(start).take(n).map(pick).collect()
        } else {
            self.order.iter().skip(start).take(n).map(pick).collect()
        }
    }

    /// Members with scores between `lo` and `hi` (each `(score, exclusive)`), ascending or,
    /// if `rev`, from the highest.
    pub fn by_score(
        &self,
        (lo, lo_excl): (f64, bool),
        (hi, hi_excl): (f64, bool),
        rev: bool,
    ) -> Box<dyn Iterator<Item = (&[u8], f64)> + '_> {
        let above_lo = move |s: f64| s > lo || (!lo_excl && s == lo);
        let below_hi = move |s: f64| s < hi || (!hi_excl && s == hi);
        fn pick((s, m): &(Score, Vec<u8>)) -> (&[u8], f64) {
            (m, s.0)
        }
        if rev {
            Box::new(
                self.order
                    .iter()
                    .rev()
                    .skip_while(move |(s, _)| !below_hi(s.0))
                    .take_while(move |(s, _)| above_lo(s.0))
                    .map(pick),
            )
        } else {
            Box::new(
                self.order
                    .iter()
                    .skip_while(move |(s, _)| !above_lo(s.0))
                    .take_while(move |(s, _)| below_hi(s.0))
                    .map(pick),
            )
        }
    }

    /// Removes and returns the lowest (or, if `max`, highest) member.
    pub fn pop(&mut self, max: bool) -> Option<(Vec<u8>, f64)> {
        let (s, m) = if max { self.order.pop_last() } else { self.order.pop_first() }?;
        self.scores.remove(&m);
        self.bytes -= 2 * charge(&m) + 16;
        Some((m, s.0))
    }
}

/// Formats a score as C's `%.17g` (what Redis 7.0 replies for doubles), `inf`/`-inf` for
/// the infinities.
pub fn format_score(d: f64, out: &mut Vec<u8>) {
    if d.is_infinite() {
        out.extend_from_slice(if d > 0.0 { b"inf" } else { b"-inf" });
        return;
    }
    if d.is_nan() {
        out.extend_from_slice(b"nan");
        return;
    }
    // 17 significant digits, correctly rounded, as d.dddddddddddddddde±X.
    let sci = alloc::format!("{:.16e}", d);
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let negative = mantissa.starts_with('-');
    let digits: Vec<u8> = mantissa.bytes().filter(u8::is_ascii_digit).collect();
    if negative {
        out.push(b'-');
    }
    if !(-4..17).contains(&exp) {
        let mut m = digits.clone();
        while m.len() > 1 && m.last() == Some(&b'0') {
            m.pop();
        }
        out.extend_from_slice(m.get(..1).unwrap_or(b"0"));
        if m.len() > 1 {
            out.push(b'.');
            out.extend_from_slice(m.get(1..).unwrap_or(&[]));
        }
        out.push(b'e');
        out.push(if exp < 0 { b'-' } else { b'+' });
        let e = exp.unsigned_abs();
        if e < 10 {
            out.push(b'0');
        }
        out.extend_from_slice(alloc::format!("{e}").as_bytes());
        return;
    }
    let mut int_part: Vec<u8>;
    let mut frac: Vec<u8>;
    if exp >= 0 {
        let split = (exp as usize + 1).min(digits.len());
        int_part = digits.get(..split).unwrap_or(&[]).to_vec();
        frac = digits.get(split..).unwrap_or(&[]).to_vec();
    } else {
        int_part = b"0".to_vec();
        frac = alloc::vec![b'0'; (-exp - 1) as usize];
        frac.extend_from_slice(&digits);
    }
    while frac.last() == Some(&b'0') {
        frac.pop();
    }
    if int_part.is_empty() {
        int_part.push(b'0');
    }
    out.extend_from_slice(&int_part);
    if !frac.is_empty() {
        out.push(b'.');
        out.extend_from_slice(&frac);
    }
}

/// Parses a score as Redis's `getDoubleFromObject` (strtod over the whole argument, no
/// leading space, no NaN, no overflow to infinity or underflow to zero).
pub fn parse_score(a: &[u8]) -> Option<f64> {
    let s = core::str::from_utf8(a).ok()?;
    if s.is_empty() || s.starts_with(|c: char| c.is_ascii_whitespace()) {
        return None;
    }
    let v: f64 = s.parse().ok()?;
    if v.is_nan() {
        return None;
    }
    let lower = s.to_ascii_lowercase();
    let body = lower.trim_start_matches(['+', '-']);
    if v.is_infinite() && !(body == "inf" || body == "infinity") {
        return None;
    }
    let mantissa = body.split('e').next().unwrap_or("");
    if v == 0.0 && mantissa.bytes().any(|b| (b'1'..=b'9').contains(&b)) {
        return None;
    }
    Some(v)
}
