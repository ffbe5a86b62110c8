//! The commands: lookup by case-insensitive name, Redis's arity rule, and each command's
//! semantics and reply texts (Redis 7.0's, checked against `redis-server` 7.0.15).

use alloc::vec::Vec;
use core::mem;
use core::num::NonZeroU64;

use super::glob::Glob;
use super::info::{self, Figures};
use super::resp::{self, MAX_BULK_BYTES, parse_i64};
use super::store::{Detached, Store, Ttl};

/// What the connection does after a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Go on with the next request.
    Continue,
    /// Send what was written, then close (QUIT).
    Close,
}

/// Everything a command may use.
pub struct Ctx<'a> {
    /// The keyspace.
    pub store: &'a mut Store,
    /// The caller's clock, in ms.
    pub now: u64,
    /// Figures for INFO, fetched only when asked for.
    pub figures: &'a dyn Fn() -> Figures,
    /// Where replies go.
    pub out: &'a mut Vec<u8>,
    /// Where FLUSHALL puts the old keyspace, to be freed after the store's lock is released.
    pub detached: &'a mut Option<Detached>,
}

impl core::fmt::Debug for Ctx<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Ctx").field("now", &self.now).field("out_len", &self.out.len()).finish_non_exhaustive()
    }
}

/// A command's failure, answered as an error reply (the connection stays open).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    /// Wrong argument count for the named command (`get`, `config|get`, …).
    WrongArity(&'static str),
    /// Options that do not parse.
    Syntax,
    /// An argument or stored value that should be an integer and is not (or is out of range).
    NotInteger,
    /// INCR/DECR past the `i64` range.
    Overflow,
    /// DECRBY by `i64::MIN`.
    DecrementOverflow,
    /// An expire time that is not positive (SET, SETEX) or overflows; names the command.
    InvalidExpire(&'static str),
    /// SELECT of a database other than 0.
    DbIndexOutOfRange,
    /// A subcommand the command does not have: the subcommand as sent, and the command.
    UnknownSubcommand(Vec<u8>, &'static str),
    /// An EXPIRE option that is not NX/XX/GT/LT.
    UnsupportedOption(Vec<u8>),
    /// EXPIRE with NX and another condition.
    NxWithOthers,
    /// EXPIRE with both GT and LT.
    GtAndLt,
    /// APPEND past [`MAX_BULK_BYTES`].
    StringTooLong,
    /// CONFIG SET (nothing is settable); holds the parameter.
    ConfigSet(Vec<u8>),
}

impl CommandError {
    /// Appends the error reply.
    pub fn reply(&self, out: &mut Vec<u8>) {
        let mut m: Vec<u8> = Vec::with_capacity(64);
        m.extend_from_slice(b"ERR ");
        let mut put = |parts: &[&[u8]]| parts.iter().for_each(|p| m.extend_from_slice(p));
        match self {
            Self::WrongArity(name) => put(&[b"wrong number of arguments for '", name.as_bytes(), b"' command"]),
            Self::Syntax => put(&[b"syntax error"]),
            Self::NotInteger => put(&[b"value is not an integer or out of range"]),
            Self::Overflow => put(&[b"increment or decrement would overflow"]),
            Self::DecrementOverflow => put(&[b"decrement would overflow"]),
            Self::InvalidExpire(name) => put(&[b"invalid expire time in '", name.as_bytes(), b"' command"]),
            Self::DbIndexOutOfRange => put(&[b"DB index is out of range"]),
            Self::UnknownSubcommand(sub, cmd) => {
                put(&[b"unknown subcommand '", c_str(sub, 128), b"'. Try ", cmd.as_bytes(), b" HELP."])
            }
            Self::UnsupportedOption(opt) => put(&[b"Unsupported option ", c_str(opt, usize::MAX)]),
            Self::NxWithOthers => put(&[b"NX and XX, GT or LT options at the same time are not compatible"]),
            Self::GtAndLt => put(&[b"GT and LT options at the same time are not compatible"]),
            Self::StringTooLong => put(&[b"string exceeds maximum allowed size (proto-max-bulk-len)"]),
            Self::ConfigSet(param) => {
                put(&[b"Unknown option or number of arguments for CONFIG SET - '", c_str(param, usize::MAX), b"'"])
            }
        }
        resp::error(out, &m);
    }
}

/// `s` as C's `%.{max}s` prints it: up to the first NUL, at most `max` bytes.
fn c_str(s: &[u8], max: usize) -> &[u8] {
    let end = s.iter().position(|&b| b == 0).unwrap_or(s.len()).min(max);
    s.get(..end).unwrap_or(s)
}

type Run = fn(&mut Ctx<'_>, &mut [Vec<u8>]) -> Result<Flow, CommandError>;

/// A command: its lower-case name, Redis arity (`n` = exactly n words with the name, `-n` = at
/// least n) and body.
#[derive(Clone, Copy)]
pub struct Command {
    /// Name, lower case (as in arity errors).
    pub name: &'static str,
    /// Redis arity.
    pub arity: i32,
    run: Run,
}

impl core::fmt::Debug for Command {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Command").field("name", &self.name).field("arity", &self.arity).finish()
    }
}

const fn cmd(name: &'static str, arity: i32, run: Run) -> Command {
    Command { name, arity, run }
}

/// Every command this service understands.
pub const COMMANDS: &[Command] = &[
    cmd("get", 2, get),
    cmd("set", -3, set),
    cmd("ping", -1, ping),
    cmd("incr", 2, |c, a| incr_by(c, a, 1)),
    cmd("mset", -3, mset),
    cmd("mget", -2, mget),
    cmd("del", -2, del),
    cmd("unlink", -2, del),
    cmd("exists", -2, exists),
    cmd("decr", 2, |c, a| incr_by(c, a, -1)),
    cmd("incrby", 3, incrby),
    cmd("decrby", 3, decrby),
    cmd("append", 3, append),
    cmd("strlen", 2, strlen),
    cmd("setnx", 3, setnx),
    cmd("setex", 4, |c, a| setex(c, a, "setex", 1000)),
    cmd("psetex", 4, |c, a| setex(c, a, "psetex", 1)),
    cmd("getdel", 2, getdel),
    cmd("type", 2, type_),
    cmd("ttl", 2, |c, a| ttl(c, a, 1000)),
    cmd("pttl", 2, |c, a| ttl(c, a, 1)),
    cmd("expire", -3, |c, a| expire(c, a, "expire", 1000)),
    cmd("pexpire", -3, |c, a| expire(c, a, "pexpire", 1)),
    cmd("persist", 2, persist),
    cmd("echo", 2, echo),
    cmd("dbsize", 1, dbsize),
    cmd("flushall", -1, flush),
    cmd("flushdb", -1, flush),
    cmd("keys", 2, keys),
    cmd("info", -1, info),
    cmd("config", -2, config),
    cmd("command", -1, command),
    cmd("select", 2, select),
    cmd("quit", -1, |c, _| {
        resp::simple(c.out, "OK");
        Ok(Flow::Close)
    }),
];

/// The command called `name` (any case).
pub fn lookup(name: &[u8]) -> Option<&'static Command> {
    COMMANDS.iter().find(|c| c.name.len() == name.len() && c.name.as_bytes().eq_ignore_ascii_case(name))
}

/// Runs the request `args` (non-empty), appending its reply to `ctx.out`.
pub fn execute(ctx: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Flow {
    let Some(name) = args.first() else { return Flow::Continue };
    let Some(c) = lookup(name) else {
        unknown_command(ctx.out, args);
        return Flow::Continue;
    };
    let n = args.len();
    let fits = if c.arity >= 0 { n == c.arity as usize } else { n >= c.arity.unsigned_abs() as usize };
    ctx.store.count_command();
    let result = if fits { (c.run)(ctx, args) } else { Err(CommandError::WrongArity(c.name)) };
    result.unwrap_or_else(|e| {
        e.reply(ctx.out);
        Flow::Continue
    })
}

/// Redis 7's unknown-command error: the name (128 bytes at most) and the first arguments,
/// quoted, until 128 bytes of them have been shown.
fn unknown_command(out: &mut Vec<u8>, args: &[Vec<u8>]) {
    let mut shown: Vec<u8> = Vec::new();
    for a in args.iter().skip(1) {
        if shown.len() >= 128 {
            break;
        }
        let room = 128 - shown.len();
        shown.push(b'\'');
        shown.extend_from_slice(c_str(a, room));
        shown.extend_from_slice(b"' ");
    }
    let mut m = b"ERR unknown command '".to_vec();
    m.extend_from_slice(c_str(args.first().map_or(&[][..], |a| a), 128));
    m.extend_from_slice(b"', with args beginning with: ");
    m.extend_from_slice(&shown);
    resp::error(out, &m);
}

/// Argument `i` (empty if absent; arity checks make it present).
fn arg(args: &[Vec<u8>], i: usize) -> &[u8] {
    args.get(i).map_or(&[][..], |a| a)
}

/// Moves argument `i` out.
fn take(args: &mut [Vec<u8>], i: usize) -> Vec<u8> {
    args.get_mut(i).map(mem::take).unwrap_or_default()
}

fn is(a: &[u8], word: &str) -> bool {
    a.eq_ignore_ascii_case(word.as_bytes())
}

fn integer(a: &[u8]) -> Result<i64, CommandError> {
    parse_i64(a).ok_or(CommandError::NotInteger)
}

fn now_i64(now: u64) -> i64 {
    i64::try_from(now).unwrap_or(i64::MAX)
}

/// The deadline for a positive relative expire `amount × unit_ms` (SET EX/PX, SETEX,
/// PSETEX), or the error Redis gives.
fn relative_deadline(amount: &[u8], unit_ms: i64, now: u64, name: &'static str) -> Result<NonZeroU64, CommandError> {
    let n = integer(amount)?;
    if n <= 0 || n > i64::MAX / unit_ms {
        return Err(CommandError::InvalidExpire(name));
    }
    let when = (n * unit_ms).checked_add(now_i64(now)).ok_or(CommandError::InvalidExpire(name))?;
    u64::try_from(when).ok().and_then(NonZeroU64::new).ok_or(CommandError::InvalidExpire(name))
}

fn ok(out: &mut Vec<u8>) -> Result<Flow, CommandError> {
    resp::simple(out, "OK");
    Ok(Flow::Continue)
}

fn done() -> Result<Flow, CommandError> {
    Ok(Flow::Continue)
}

fn ping(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    match args {
        [_] => resp::simple(c.out, "PONG"),
        [_, msg] => resp::bulk(c.out, msg),
        _ => return Err(CommandError::WrongArity("ping")),
    }
    done()
}

fn echo(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    resp::bulk(c.out, arg(args, 1));
    done()
}

fn get(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    match c.store.read(arg(args, 1), c.now) {
        Some(e) => resp::bulk(c.out, &e.value),
        None => resp::null(c.out),
    }
    done()
}

/// SET key value [NX|XX] [GET] [EX s|PX ms|KEEPTTL] (EXAT/PXAT are not supported: the
/// caller's clock need not be Unix time).
fn set(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    #[derive(PartialEq)]
    enum Unit {
        S,
        Ms,
    }
    let (mut nx, mut xx, mut get, mut keep) = (false, false, false, false);
    let mut expire: Option<(usize, Unit)> = None;
    let mut j = 3;
    while j < args.len() {
        let opt = arg(args, j);
        let has_next = j + 1 < args.len();
        let unit = expire.as_ref().map(|(_, u)| u);
        if is(opt, "nx") && !xx {
            nx = true;
        } else if is(opt, "xx") && !nx {
            xx = true;
        } else if is(opt, "get") {
            get = true;
        } else if is(opt, "keepttl") && expire.is_none() {
            keep = true;
        } else if is(opt, "ex") && !keep && unit != Some(&Unit::Ms) && has_next {
            expire = Some((j + 1, Unit::S));
            j += 1;
        } else if is(opt, "px") && !keep && unit != Some(&Unit::S) && has_next {
            expire = Some((j + 1, Unit::Ms));
            j += 1;
        } else {
            return Err(CommandError::Syntax);
        }
        j += 1;
    }
    let ttl = match expire {
        Some((i, unit)) => {
            Ttl::At(relative_deadline(arg(args, i), if unit == Unit::S { 1000 } else { 1 }, c.now, "set")?)
        }
        None if keep => Ttl::Keep,
        None => Ttl::Clear,
    };
    let key = take(args, 1);
    if get {
        match c.store.read(&key, c.now) {
            Some(e) => resp::bulk(c.out, &e.value),
            None => resp::null(c.out),
        }
    }
    let found = c.store.peek(&key, c.now).is_some();
    if (nx && found) || (xx && !found) {
        if !get {
            resp::null(c.out);
        }
        return done();
    }
    c.store.set(key, take(args, 2), ttl, c.now);
    if !get {
        resp::simple(c.out, "OK");
    }
    done()
}

fn setnx(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    if c.store.peek(arg(args, 1), c.now).is_some() {
        resp::int(c.out, 0);
    } else {
        c.store.set(take(args, 1), take(args, 2), Ttl::Clear, c.now);
        resp::int(c.out, 1);
    }
    done()
}

fn setex(c: &mut Ctx<'_>, args: &mut [Vec<u8>], name: &'static str, unit_ms: i64) -> Result<Flow, CommandError> {
    let due = relative_deadline(arg(args, 2), unit_ms, c.now, name)?;
    c.store.set(take(args, 1), take(args, 3), Ttl::At(due), c.now);
    ok(c.out)
}

fn getdel(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let key = arg(args, 1);
    if c.store.read(key, c.now).is_none() {
        resp::null(c.out);
    } else if let Some(v) = c.store.take(key, c.now) {
        resp::bulk(c.out, &v);
    }
    done()
}

fn type_(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let found = c.store.read(arg(args, 1), c.now).is_some();
    resp::simple(c.out, if found { "string" } else { "none" });
    done()
}

fn del(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let now = c.now;
    let n = args.iter().skip(1).filter(|k| c.store.take(k, now).is_some()).count();
    resp::int(c.out, n as i64);
    done()
}

fn exists(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let now = c.now;
    let n = args.iter().skip(1).filter(|k| c.store.read(k, now).is_some()).count();
    resp::int(c.out, n as i64);
    done()
}

fn incrby(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let by = integer(arg(args, 2))?;
    incr_by(c, args, by)
}

fn decrby(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let by = integer(arg(args, 2))?;
    if by == i64::MIN {
        return Err(CommandError::DecrementOverflow);
    }
    incr_by(c, args, -by)
}

/// Adds `by` to the integer at `args[1]` (0 if absent), keeping its deadline.
fn incr_by(c: &mut Ctx<'_>, args: &mut [Vec<u8>], by: i64) -> Result<Flow, CommandError> {
    let key = arg(args, 1);
    let old = match c.store.peek(key, c.now) {
        Some(e) => Some(integer(&e.value)?),
        None => None,
    };
    let new = old.unwrap_or(0).checked_add(by).ok_or(CommandError::Overflow)?;
    let mut digits = Vec::with_capacity(20);
    resp::push_decimal(&mut digits, new);
    if old.is_some() {
        c.store.update(key, c.now, |v| *v = digits);
    } else {
        c.store.set(take(args, 1), digits, Ttl::Clear, c.now);
    }
    resp::int(c.out, new);
    done()
}

fn mget(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    resp::array(c.out, args.len() - 1);
    for k in args.iter().skip(1) {
        match c.store.read(k, c.now) {
            Some(e) => resp::bulk(c.out, &e.value),
            None => resp::null(c.out),
        }
    }
    done()
}

fn mset(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    if args.len().is_multiple_of(2) {
        return Err(CommandError::WrongArity("mset"));
    }
    for pair in args.get_mut(1..).unwrap_or_default().chunks_exact_mut(2) {
        let [k, v] = pair else { continue };
        c.store.set(mem::take(k), mem::take(v), Ttl::Clear, c.now);
    }
    ok(c.out)
}

fn append(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let more = arg(args, 2);
    let grown = c.store.update(arg(args, 1), c.now, |v| {
        if v.len() + more.len() > MAX_BULK_BYTES {
            return Err(CommandError::StringTooLong);
        }
        v.extend_from_slice(more);
        Ok(v.len())
    });
    let len = match grown {
        Some(r) => r?,
        None => {
            let v = take(args, 2);
            let len = v.len();
            c.store.set(take(args, 1), v, Ttl::Clear, c.now);
            len
        }
    };
    resp::int(c.out, len as i64);
    done()
}

fn strlen(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let n = c.store.read(arg(args, 1), c.now).map_or(0, |e| e.value.len());
    resp::int(c.out, n as i64);
    done()
}

fn ttl(c: &mut Ctx<'_>, args: &mut [Vec<u8>], unit_ms: u64) -> Result<Flow, CommandError> {
    let reply = match c.store.read(arg(args, 1), c.now) {
        None => -2,
        Some(e) => match e.due() {
            None => -1,
            Some(d) => {
                let left = d.saturating_sub(c.now);
                i64::try_from((left + unit_ms / 2) / unit_ms).unwrap_or(i64::MAX)
            }
        },
    };
    resp::int(c.out, reply);
    done()
}

/// EXPIRE/PEXPIRE key time [NX|XX|GT|LT]: a time at or before now deletes the key.
fn expire(c: &mut Ctx<'_>, args: &mut [Vec<u8>], name: &'static str, unit_ms: i64) -> Result<Flow, CommandError> {
    let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
    for opt in args.iter().skip(3) {
        match () {
            _ if is(opt, "nx") => nx = true,
            _ if is(opt, "xx") => xx = true,
            _ if is(opt, "gt") => gt = true,
            _ if is(opt, "lt") => lt = true,
            _ => return Err(CommandError::UnsupportedOption(opt.clone())),
        }
    }
    if nx && (xx || gt || lt) {
        return Err(CommandError::NxWithOthers);
    }
    if gt && lt {
        return Err(CommandError::GtAndLt);
    }
    let n = integer(arg(args, 2))?;
    let ms = n.checked_mul(unit_ms).ok_or(CommandError::InvalidExpire(name))?;
    let when = ms.checked_add(now_i64(c.now)).ok_or(CommandError::InvalidExpire(name))?;
    let key = arg(args, 1);
    let Some(e) = c.store.peek(key, c.now) else {
        resp::int(c.out, 0);
        return done();
    };
    let current = e.due().map(|d| i64::try_from(d).unwrap_or(i64::MAX));
    let refused = (nx && current.is_some())
        || (xx && current.is_none())
        || (gt && current.is_none_or(|cur| when <= cur))
        || (lt && current.is_some_and(|cur| when >= cur));
    if refused {
        resp::int(c.out, 0);
        return done();
    }
    match u64::try_from(when).ok().filter(|&w| w > c.now).and_then(NonZeroU64::new) {
        Some(due) => {
            c.store.expire_at(key, Some(due), c.now);
        }
        None => {
            c.store.take(key, c.now);
        }
    }
    resp::int(c.out, 1);
    done()
}

fn persist(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let key = arg(args, 1);
    let volatile = c.store.peek(key, c.now).is_some_and(|e| e.due().is_some());
    if volatile {
        c.store.expire_at(key, None, c.now);
    }
    resp::int(c.out, i64::from(volatile));
    done()
}

fn dbsize(c: &mut Ctx<'_>, _args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    resp::int(c.out, c.store.len() as i64);
    done()
}

/// FLUSHALL/FLUSHDB [ASYNC|SYNC]: the store is empty at once; the old keys and values are
/// freed by [`super::Session::release`] (outside the lock) whatever the mode.
fn flush(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    match args {
        [_] => {}
        [_, mode] if is(mode, "async") || is(mode, "sync") => {}
        _ => return Err(CommandError::Syntax),
    }
    // A keyspace detached earlier and not released yet is freed here.
    *c.detached = Some(c.store.detach());
    ok(c.out)
}

/// KEYS pattern: live keys matching, in key order (O(n), like Redis).
fn keys(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let pattern = arg(args, 1);
    let all = pattern == b"*";
    let glob = Glob::new(pattern, false);
    let found: Vec<&[u8]> = c.store.live_keys(c.now).filter(|k| all || glob.matches(k)).collect();
    resp::array(c.out, found.len());
    for k in found {
        resp::bulk(c.out, k);
    }
    done()
}

fn info(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let figures = (c.figures)();
    let text = info::render(args.get(1..).unwrap_or_default(), c.store, &figures, c.now);
    resp::bulk(c.out, text.as_bytes());
    done()
}

/// Configuration parameters CONFIG GET reports (read-only).
pub const CONFIG: &[(&str, &str)] = &[("save", ""), ("appendonly", "no"), ("databases", "1")];

fn help(out: &mut Vec<u8>, lines: &[&str]) -> Result<Flow, CommandError> {
    resp::array(out, lines.len());
    for l in lines {
        resp::simple(out, l);
    }
    done()
}

/// CONFIG GET pattern [pattern ...] | SET (refused) | HELP.
fn config(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let sub = arg(args, 1);
    if is(sub, "get") {
        if args.len() < 3 {
            return Err(CommandError::WrongArity("config|get"));
        }
        // As Redis 7: a plain name is echoed as given; a pattern yields canonical names.
        let mut hits: Vec<(&[u8], &str)> = Vec::new();
        for p in args.iter().skip(2) {
            let plain = !p.iter().any(|b| matches!(b, b'*' | b'?' | b'['));
            let glob = Glob::new(p, true);
            for (name, value) in CONFIG {
                let hit = if plain { p.eq_ignore_ascii_case(name.as_bytes()) } else { glob.matches(name.as_bytes()) };
                if hit && !hits.iter().any(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes())) {
                    hits.push((if plain { p } else { name.as_bytes() }, value));
                }
            }
        }
        resp::array(c.out, 2 * hits.len());
        for (name, value) in hits {
            resp::bulk(c.out, name);
            resp::bulk(c.out, value.as_bytes());
        }
        done()
    } else if is(sub, "set") {
        if args.len() < 4 {
            return Err(CommandError::WrongArity("config|set"));
        }
        Err(CommandError::ConfigSet(arg(args, 2).to_vec()))
    } else if is(sub, "help") && args.len() == 2 {
        help(
            c.out,
            &[
                "CONFIG <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
                "GET <pattern>",
                "    Return parameters matching the glob-like <pattern> and their values.",
                "SET <directive> <value>",
                "    Refused: this server's configuration is fixed.",
                "HELP",
                "    Prints this help.",
            ],
        )
    } else {
        Err(CommandError::UnknownSubcommand(sub.to_vec(), "CONFIG"))
    }
}

/// COMMAND [DOCS ...|COUNT|HELP]: no command documentation is served (an empty array, which
/// redis-cli accepts), COUNT is the number of commands.
fn command(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let Some(sub) = args.get(1) else {
        resp::array(c.out, 0);
        return done();
    };
    if is(sub, "docs") {
        resp::array(c.out, 0);
        done()
    } else if is(sub, "count") {
        if args.len() != 2 {
            return Err(CommandError::WrongArity("command|count"));
        }
        resp::int(c.out, COMMANDS.len() as i64);
        done()
    } else if is(sub, "help") && args.len() == 2 {
        help(
            c.out,
            &[
                "COMMAND <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
                "(no subcommand)",
                "    Return an empty list (no command details are served).",
                "COUNT",
                "    Return the total number of commands in this server.",
                "DOCS [<command-name> ...]",
                "    Return an empty list (no documentation is served).",
                "HELP",
                "    Prints this help.",
            ],
        )
    } else {
        Err(CommandError::UnknownSubcommand(sub.to_vec(), "COMMAND"))
    }
}

fn select(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    match integer(arg(args, 1))? {
        0 => ok(c.out),
        _ => Err(CommandError::DbIndexOutOfRange),
    }
}
