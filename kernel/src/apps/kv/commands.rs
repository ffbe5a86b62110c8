//! The commands: lookup by case-insensitive name, Redis's arity rule, and each command's
//! semantics and reply texts (Redis 7.0's, checked against `redis-server` 7.0.15).

use alloc::vec::Vec;
use core::mem;
use core::num::NonZeroU64;

use super::Client;
use super::glob::Glob;
use super::info::{self, Figures};
use super::resp::{self, MAX_BULK_BYTES, parse_i64};
use super::store::{Detached, Entry, Store, Ttl};
use super::types::{self, Hash, List, Set, Value, ZSet};

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
    /// The connection's identity (CLIENT).
    pub client: &'a mut Client,
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
    /// A command for one type run on a key holding another.
    WrongType,
    /// An argument that should be a float and is not.
    NotFloat,
    /// HINCRBY on a field whose value is not an integer.
    HashNotInteger,
    /// LSET past the list's end.
    IndexOutOfRange,
    /// LSET on a missing key.
    NoSuchKey,
    /// A negative count (LPOP, SPOP, ZPOPMIN…).
    MustBePositive,
    /// ZADD with XX and NX.
    ZaddXxNx,
    /// ZADD with GT, LT and NX mixed.
    ZaddGtLtNx,
    /// ZADD INCR with more than one pair.
    ZaddIncrPairs,
    /// A score that became NaN (inf + -inf).
    ScoreNan,
    /// CLIENT SETNAME with a space or special character.
    ClientName,
    /// ZRANGE's LIMIT without BYSCORE/BYLEX.
    LimitWithoutBy,
    /// A score range end that is not a float.
    MinMaxNotFloat,
    /// The VM could not get the memory the command needs.
    Oom,
}

impl CommandError {
    /// Appends the error reply.
    pub fn reply(&self, out: &mut Vec<u8>) {
        match self {
            Self::WrongType => {
                return resp::error(out, b"WRONGTYPE Operation against a key holding the wrong kind of value");
            }
            Self::Oom => return resp::error(out, OOM),
            _ => {}
        }
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
            Self::NotFloat => put(&[b"value is not a valid float"]),
            Self::HashNotInteger => put(&[b"hash value is not an integer"]),
            Self::IndexOutOfRange => put(&[b"index out of range"]),
            Self::NoSuchKey => put(&[b"no such key"]),
            Self::MustBePositive => put(&[b"value is out of range, must be positive"]),
            Self::ZaddXxNx => put(&[b"XX and NX options at the same time are not compatible"]),
            Self::ZaddGtLtNx => put(&[b"GT, LT, and/or NX options at the same time are not compatible"]),
            Self::ZaddIncrPairs => put(&[b"INCR option supports a single increment-element pair"]),
            Self::ScoreNan => put(&[b"resulting score is not a number (NaN)"]),
            Self::ClientName => put(&[b"Client names cannot contain spaces, newlines or special characters."]),
            Self::LimitWithoutBy => {
                put(&[b"syntax error, LIMIT is only supported in combination with either BYSCORE or BYLEX"])
            }
            Self::MinMaxNotFloat => put(&[b"min or max is not a float"]),
            Self::WrongType | Self::Oom => {}
        }
        resp::error(out, &m);
    }
}

/// Redis's out-of-memory error (without the `-`): what a request gets when the VM cannot get
/// the memory it needs.
pub const OOM: &[u8] = b"OOM command not allowed when used memory > 'maxmemory'.";

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
    cmd("client", -2, client),
    cmd("lpush", -3, |c, a| push(c, a, true, true)),
    cmd("rpush", -3, |c, a| push(c, a, false, true)),
    cmd("lpushx", -3, |c, a| push(c, a, true, false)),
    cmd("rpushx", -3, |c, a| push(c, a, false, false)),
    cmd("lpop", -2, |c, a| pop(c, a, true)),
    cmd("rpop", -2, |c, a| pop(c, a, false)),
    cmd("llen", 2, llen),
    cmd("lindex", 3, lindex),
    cmd("lrange", 4, lrange),
    cmd("lrem", 4, lrem),
    cmd("lset", 4, lset),
    cmd("ltrim", 4, ltrim),
    cmd("hset", -4, |c, a| hset(c, a, "hset")),
    cmd("hmset", -4, |c, a| hset(c, a, "hmset")),
    cmd("hsetnx", 4, hsetnx),
    cmd("hget", 3, hget),
    cmd("hmget", -3, hmget),
    cmd("hgetall", 2, |c, a| hgetall(c, a, true, true)),
    cmd("hkeys", 2, |c, a| hgetall(c, a, true, false)),
    cmd("hvals", 2, |c, a| hgetall(c, a, false, true)),
    cmd("hdel", -3, hdel),
    cmd("hlen", 2, hlen),
    cmd("hexists", 3, hexists),
    cmd("hstrlen", 3, hstrlen),
    cmd("hincrby", 4, hincrby),
    cmd("sadd", -3, sadd),
    cmd("srem", -3, srem),
    cmd("smembers", 2, smembers),
    cmd("sismember", 3, sismember),
    cmd("smismember", -3, smismember),
    cmd("scard", 2, scard),
    cmd("spop", -2, spop),
    cmd("zadd", -4, zadd),
    cmd("zincrby", 4, zincrby),
    cmd("zscore", 3, zscore),
    cmd("zmscore", -3, zmscore),
    cmd("zrem", -3, zrem),
    cmd("zcard", 2, zcard),
    cmd("zrank", 3, |c, a| zrank(c, a, false)),
    cmd("zrevrank", 3, |c, a| zrank(c, a, true)),
    cmd("zrange", -4, |c, a| zrange(c, a, RangeBy::Auto, None)),
    cmd("zrevrange", -4, |c, a| zrange(c, a, RangeBy::Rank, Some(true))),
    cmd("zrangebyscore", -4, |c, a| zrange(c, a, RangeBy::Score, Some(false))),
    cmd("zrevrangebyscore", -4, |c, a| zrange(c, a, RangeBy::Score, Some(true))),
    cmd("zcount", 4, zcount),
    cmd("zpopmin", -2, |c, a| zpop(c, a, false)),
    cmd("zpopmax", -2, |c, a| zpop(c, a, true)),
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

/// The string an entry holds, or WRONGTYPE.
fn string_of(e: &Entry) -> Result<&[u8], CommandError> {
    match &e.value {
        Value::Str(v) => Ok(v),
        _ => Err(CommandError::WrongType),
    }
}

/// Room for an array reply of `items` bulk strings holding `payload` bytes in all (their
/// headers and CRLFs included), reserved in `out` before anything is written: a reply the VM
/// cannot get the memory for is an OOM error, not an allocation failure halfway through it.
fn reserve_reply(out: &mut Vec<u8>, items: usize, payload: usize) -> Result<(), CommandError> {
    let bytes = payload.saturating_add(items.saturating_mul(REPLY_ITEM_OVERHEAD)).saturating_add(16);
    out.try_reserve(bytes).map_err(|_| CommandError::Oom)
}

/// Most bytes a bulk string's framing takes (`$`, up to 20 digits, two CRLFs), or a score.
const REPLY_ITEM_OVERHEAD: usize = 48;

/// Appends a bulk reply of `data`, or fails with OOM when the reply cannot be buffered.
fn bulk_or_oom(out: &mut Vec<u8>, data: &[u8]) -> Result<(), CommandError> {
    out.try_reserve(data.len() + 16).map_err(|_| CommandError::Oom)?;
    resp::bulk(out, data);
    Ok(())
}

fn get(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    match c.store.read(arg(args, 1), c.now) {
        Some(e) => bulk_or_oom(c.out, string_of(e)?)?,
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
            Some(e) => bulk_or_oom(c.out, string_of(e)?)?,
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
    match c.store.read(key, c.now) {
        None => resp::null(c.out),
        Some(e) => {
            bulk_or_oom(c.out, string_of(e)?)?;
            c.store.take(key, c.now);
        }
    }
    done()
}

fn type_(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let name = c.store.read(arg(args, 1), c.now).map_or("none", |e| e.value.type_name());
    resp::simple(c.out, name);
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
        Some(e) => Some(integer(string_of(e)?)?),
        None => None,
    };
    let new = old.unwrap_or(0).checked_add(by).ok_or(CommandError::Overflow)?;
    let mut digits = Vec::with_capacity(20);
    resp::push_decimal(&mut digits, new);
    if old.is_some() {
        c.store.update(key, c.now, |v| *v = Value::Str(digits));
    } else {
        c.store.set(take(args, 1), digits, Ttl::Clear, c.now);
    }
    resp::int(c.out, new);
    done()
}

fn mget(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    resp::array(c.out, args.len() - 1);
    for k in args.iter().skip(1) {
        match c.store.read(k, c.now).map(|e| &e.value) {
            Some(Value::Str(v)) => bulk_or_oom(c.out, v)?,
            _ => resp::null(c.out),
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
        let Value::Str(v) = v else { return Err(CommandError::WrongType) };
        if v.len() + more.len() > MAX_BULK_BYTES {
            return Err(CommandError::StringTooLong);
        }
        if v.try_reserve(more.len()).is_err() {
            v.try_reserve_exact(more.len()).map_err(|_| CommandError::Oom)?;
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
    let n = match c.store.read(arg(args, 1), c.now) {
        Some(e) => string_of(e)?.len(),
        None => 0,
    };
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
    reserve_reply(c.out, found.len(), found.iter().map(|k| k.len()).sum())?;
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
/// Values are this server's (one database, no persistence, no eviction, no memory cap but
/// the VM's) or Redis 7.0's defaults where the setting has no meaning here.
pub const CONFIG: &[(&str, &str)] = &[
    ("save", ""),
    ("appendonly", "no"),
    ("appendfsync", "everysec"),
    ("databases", "1"),
    ("maxmemory", "0"),
    ("maxmemory-policy", "noeviction"),
    ("maxmemory-samples", "5"),
    ("maxclients", "10000"),
    ("timeout", "0"),
    ("tcp-keepalive", "300"),
    ("proto-max-bulk-len", "536870912"),
    ("client-query-buffer-limit", "1073741824"),
    ("hash-max-listpack-entries", "512"),
    ("hash-max-listpack-value", "64"),
    ("hash-max-ziplist-entries", "512"),
    ("hash-max-ziplist-value", "64"),
    ("set-max-intset-entries", "512"),
    ("cluster-enabled", "no"),
    ("notify-keyspace-events", ""),
    ("replica-read-only", "yes"),
    ("slave-read-only", "yes"),
    ("protected-mode", "no"),
    ("hz", "10"),
    ("io-threads", "1"),
    ("lua-time-limit", "5000"),
    ("activedefrag", "no"),
];

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

/// CLIENT ID | GETNAME | SETNAME name | INFO | LIST | HELP: the calling connection's identity
/// (LIST shows only the calling connection).
fn client(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let sub = arg(args, 1);
    let n = args.len();
    let arity = |want: usize, name: &'static str| if n == want { Ok(()) } else { Err(CommandError::WrongArity(name)) };
    if is(sub, "id") {
        arity(2, "client|id")?;
        resp::int(c.out, i64::try_from(c.client.id).unwrap_or(i64::MAX));
    } else if is(sub, "getname") {
        arity(2, "client|getname")?;
        match &c.client.name {
            Some(name) => resp::bulk(c.out, name),
            None => resp::null(c.out),
        }
    } else if is(sub, "setname") {
        arity(3, "client|setname")?;
        let name = take(args, 2);
        if name.iter().any(|&b| !(b'!'..=b'~').contains(&b)) {
            return Err(CommandError::ClientName);
        }
        c.client.name = if name.is_empty() { None } else { Some(name) };
        resp::simple(c.out, "OK");
    } else if is(sub, "info") || is(sub, "list") {
        let list = is(sub, "list");
        if n != 2 {
            // CLIENT LIST's filters (TYPE, ID) are not supported.
            return Err(if list { CommandError::Syntax } else { CommandError::WrongArity("client|info") });
        }
        let mut line = alloc::format!("id={} name=", c.client.id).into_bytes();
        line.extend_from_slice(c.client.name.as_deref().unwrap_or_default());
        line.extend_from_slice(b" db=0 multi=-1 resp=2 cmd=client|");
        line.extend_from_slice(if list { b"list" } else { b"info" });
        line.push(b'\n');
        resp::bulk(c.out, &line);
    } else if is(sub, "help") && n == 2 {
        return help(
            c.out,
            &[
                "CLIENT <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
                "GETNAME",
                "    Return the name of the current connection.",
                "ID",
                "    Return the ID of the current connection.",
                "INFO",
                "    Return information about the current client connection.",
                "LIST",
                "    Return information about the current client connection (only it).",
                "SETNAME <name>",
                "    Assign the name <name> to the current connection.",
                "HELP",
                "    Prints this help.",
            ],
        );
    } else {
        return Err(CommandError::UnknownSubcommand(sub.to_vec(), "CLIENT"));
    }
    done()
}

/// The value types that keys can hold besides strings.
trait Kind: Default + Sized {
    fn of(v: &Value) -> Option<&Self>;
    fn of_mut(v: &mut Value) -> Option<&mut Self>;
    fn wrap(self) -> Value;
}

macro_rules! kind {
    ($t:ident, $variant:ident) => {
        impl Kind for $t {
            fn of(v: &Value) -> Option<&Self> {
                if let Value::$variant(x) = v { Some(x) } else { None }
            }
            fn of_mut(v: &mut Value) -> Option<&mut Self> {
                if let Value::$variant(x) = v { Some(x) } else { None }
            }
            fn wrap(self) -> Value {
                Value::$variant(self)
            }
        }
    };
}

kind!(List, List);
kind!(Hash, Hash);
kind!(Set, Set);
kind!(ZSet, ZSet);

/// The collection at `key` (counting a hit or miss), `None` if the key does not exist, or
/// WRONGTYPE.
fn read<'s, T: Kind>(store: &'s mut Store, key: &[u8], now: u64) -> Result<Option<&'s T>, CommandError> {
    match store.read(key, now) {
        None => Ok(None),
        Some(e) => T::of(&e.value).map(Some).ok_or(CommandError::WrongType),
    }
}

/// Runs `f` on the collection at `key`, creating an empty one first if `create` (a
/// collection left empty is removed). `Ok(None)` if the key does not exist and `create` is
/// false.
fn with<T: Kind, R>(
    store: &mut Store,
    key: &[u8],
    now: u64,
    create: bool,
    f: impl FnOnce(&mut T) -> R,
) -> Result<Option<R>, CommandError> {
    match store.peek(key, now).map(|e| T::of(&e.value).is_some()) {
        Some(false) => return Err(CommandError::WrongType),
        None if !create => return Ok(None),
        None => store.set_value(key.to_vec(), T::default().wrap(), Ttl::Clear, now),
        Some(true) => {}
    }
    Ok(store.update(key, now, |v| T::of_mut(v).map(f)).flatten())
}

/// Redis's index range rule (LRANGE, LTRIM, ZRANGE): negative counts from the end; `None`
/// when the range is empty.
fn clamp_range(start: i64, end: i64, len: usize) -> Option<(usize, usize)> {
    let len = i64::try_from(len).unwrap_or(i64::MAX);
    let start = if start < 0 { (start + len).max(0) } else { start };
    let end = if end < 0 { end + len } else { end };
    if start > end || start >= len {
        return None;
    }
    let end = end.min(len - 1);
    Some((start as usize, end as usize))
}

/// A count argument that must not be negative.
fn count(a: &[u8]) -> Result<usize, CommandError> {
    let n = integer(a).map_err(|_| CommandError::MustBePositive)?;
    usize::try_from(n).map_err(|_| CommandError::MustBePositive)
}

fn push(c: &mut Ctx<'_>, args: &mut [Vec<u8>], left: bool, create: bool) -> Result<Flow, CommandError> {
    let key = take(args, 1);
    let items = args.get_mut(2..).unwrap_or_default();
    let len = with(c.store, &key, c.now, create, |l: &mut List| {
        items.iter_mut().for_each(|v| l.push(mem::take(v), left));
        l.len()
    })?;
    resp::int(c.out, len.unwrap_or(0) as i64);
    done()
}

/// LPOP/RPOP key [count].
fn pop(c: &mut Ctx<'_>, args: &mut [Vec<u8>], left: bool) -> Result<Flow, CommandError> {
    let n = match args.len() {
        2 => None,
        3 => Some(count(arg(args, 2))?),
        _ => return Err(CommandError::WrongArity(if left { "lpop" } else { "rpop" })),
    };
    let key = arg(args, 1);
    // Room for the reply before anything leaves the list: an OOM then loses nothing.
    if let Some(l) = read::<List>(c.store, key, c.now)? {
        let k = n.unwrap_or(1).min(l.len());
        if k > 0 {
            let (s, e) = if left { (0, k - 1) } else { (l.len() - k, l.len() - 1) };
            reserve_reply(c.out, k, l.range(s, e).map(<[u8]>::len).sum())?;
        }
    }
    let popped = with(c.store, key, c.now, false, |l: &mut List| {
        let k = n.unwrap_or(1).min(l.len());
        (0..k).filter_map(|_| l.pop(left)).collect::<Vec<_>>()
    })?;
    match (popped, n) {
        (None, None) => resp::null(c.out),
        (None, Some(_)) => c.out.extend_from_slice(b"*-1\r\n"),
        (Some(items), None) => items.first().into_iter().for_each(|v| resp::bulk(c.out, v)),
        (Some(items), Some(_)) => {
            resp::array(c.out, items.len());
            items.iter().for_each(|v| resp::bulk(c.out, v));
        }
    }
    done()
}

fn llen(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let n = read::<List>(c.store, arg(args, 1), c.now)?.map_or(0, List::len);
    resp::int(c.out, n as i64);
    done()
}

fn lindex(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let i = integer(arg(args, 2))?;
    let list = read::<List>(c.store, arg(args, 1), c.now)?;
    let item = list.and_then(|l| {
        let len = i64::try_from(l.len()).unwrap_or(i64::MAX);
        let i = if i < 0 { i + len } else { i };
        usize::try_from(i).ok().and_then(|i| l.get(i))
    });
    match item {
        Some(v) => resp::bulk(c.out, v),
        None => resp::null(c.out),
    }
    done()
}

fn lrange(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let (start, end) = (integer(arg(args, 2))?, integer(arg(args, 3))?);
    let Some(l) = read::<List>(c.store, arg(args, 1), c.now)? else {
        resp::array(c.out, 0);
        return done();
    };
    match clamp_range(start, end, l.len()) {
        None => resp::array(c.out, 0),
        Some((s, e)) => {
            reserve_reply(c.out, e - s + 1, l.range(s, e).map(<[u8]>::len).sum())?;
            resp::array(c.out, e - s + 1);
            l.range(s, e).for_each(|v| resp::bulk(c.out, v));
        }
    }
    done()
}

fn lrem(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let n = integer(arg(args, 2))?;
    let v = arg(args, 3);
    let removed = with(c.store, arg(args, 1), c.now, false, |l: &mut List| l.remove(v, n))?;
    resp::int(c.out, removed.unwrap_or(0) as i64);
    done()
}

fn lset(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let i = integer(arg(args, 2))?;
    let v = take(args, 3);
    let set = with(c.store, arg(args, 1), c.now, false, |l: &mut List| {
        let len = i64::try_from(l.len()).unwrap_or(i64::MAX);
        let i = if i < 0 { i + len } else { i };
        usize::try_from(i).is_ok_and(|i| l.set(i, v))
    })?;
    match set {
        None => Err(CommandError::NoSuchKey),
        Some(false) => Err(CommandError::IndexOutOfRange),
        Some(true) => ok(c.out),
    }
}

fn ltrim(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let (start, end) = (integer(arg(args, 2))?, integer(arg(args, 3))?);
    with(c.store, arg(args, 1), c.now, false, |l: &mut List| match clamp_range(start, end, l.len()) {
        Some((s, e)) => l.trim(s, e, true),
        None => l.trim(0, 0, false),
    })?;
    ok(c.out)
}

/// HSET/HMSET key field value [field value ...].
fn hset(c: &mut Ctx<'_>, args: &mut [Vec<u8>], name: &'static str) -> Result<Flow, CommandError> {
    if !args.len().is_multiple_of(2) {
        return Err(CommandError::WrongArity(name));
    }
    let key = take(args, 1);
    let pairs = args.get_mut(2..).unwrap_or_default();
    let added = with(c.store, &key, c.now, true, |h: &mut Hash| {
        let mut added = 0;
        for pair in pairs.chunks_exact_mut(2) {
            if let [f, v] = pair {
                added += usize::from(h.insert(mem::take(f), mem::take(v)));
            }
        }
        added
    })?;
    if name == "hmset" {
        return ok(c.out);
    }
    resp::int(c.out, added.unwrap_or(0) as i64);
    done()
}

fn hsetnx(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let key = take(args, 1);
    let (f, v) = (take(args, 2), take(args, 3));
    let added =
        with(c.store, &key, c.now, true, |h: &mut Hash| if h.get(&f).is_some() { false } else { h.insert(f, v) })?;
    resp::int(c.out, i64::from(added.unwrap_or(false)));
    done()
}

fn hget(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    match read::<Hash>(c.store, arg(args, 1), c.now)?.and_then(|h| h.get(arg(args, 2))) {
        Some(v) => resp::bulk(c.out, v),
        None => resp::null(c.out),
    }
    done()
}

fn hmget(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let h = read::<Hash>(c.store, arg(args, 1), c.now)?;
    resp::array(c.out, args.len() - 2);
    for f in args.iter().skip(2) {
        match h.and_then(|h| h.get(f)) {
            Some(v) => resp::bulk(c.out, v),
            None => resp::null(c.out),
        }
    }
    done()
}

/// HGETALL (fields and values), HKEYS, HVALS.
fn hgetall(c: &mut Ctx<'_>, args: &mut [Vec<u8>], fields: bool, values: bool) -> Result<Flow, CommandError> {
    let pairs = read::<Hash>(c.store, arg(args, 1), c.now)?.map(Hash::pairs).unwrap_or_default();
    let payload = pairs.iter().map(|(f, v)| usize::from(fields) * f.len() + usize::from(values) * v.len()).sum();
    reserve_reply(c.out, 2 * pairs.len(), payload)?;
    resp::array(c.out, pairs.len() * (usize::from(fields) + usize::from(values)));
    for (f, v) in pairs {
        if fields {
            resp::bulk(c.out, f);
        }
        if values {
            resp::bulk(c.out, v);
        }
    }
    done()
}

fn hdel(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let fields = args.get(2..).unwrap_or_default();
    let n = with(c.store, arg(args, 1), c.now, false, |h: &mut Hash| fields.iter().filter(|f| h.remove(f)).count())?;
    resp::int(c.out, n.unwrap_or(0) as i64);
    done()
}

fn hlen(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let n = read::<Hash>(c.store, arg(args, 1), c.now)?.map_or(0, Hash::len);
    resp::int(c.out, n as i64);
    done()
}

fn hexists(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let found = read::<Hash>(c.store, arg(args, 1), c.now)?.is_some_and(|h| h.get(arg(args, 2)).is_some());
    resp::int(c.out, i64::from(found));
    done()
}

fn hstrlen(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let n = read::<Hash>(c.store, arg(args, 1), c.now)?.and_then(|h| h.get(arg(args, 2))).map_or(0, <[u8]>::len);
    resp::int(c.out, n as i64);
    done()
}

fn hincrby(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let by = integer(arg(args, 3))?;
    let key = take(args, 1);
    let field = take(args, 2);
    let r = with(c.store, &key, c.now, true, |h: &mut Hash| {
        let old = match h.get(&field) {
            Some(v) => parse_i64(v).ok_or(CommandError::HashNotInteger)?,
            None => 0,
        };
        let new = old.checked_add(by).ok_or(CommandError::Overflow)?;
        let mut digits = Vec::with_capacity(20);
        resp::push_decimal(&mut digits, new);
        h.insert(field, digits);
        Ok(new)
    })?;
    match r {
        Some(Ok(n)) => resp::int(c.out, n),
        Some(Err(e)) => return Err(e),
        None => resp::int(c.out, 0),
    }
    done()
}

fn sadd(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let key = take(args, 1);
    let members = args.get_mut(2..).unwrap_or_default();
    let n = with(c.store, &key, c.now, true, |s: &mut Set| {
        members.iter_mut().map(|m| usize::from(s.insert(mem::take(m)))).sum::<usize>()
    })?;
    resp::int(c.out, n.unwrap_or(0) as i64);
    done()
}

fn srem(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let members = args.get(2..).unwrap_or_default();
    let n = with(c.store, arg(args, 1), c.now, false, |s: &mut Set| members.iter().filter(|m| s.remove(m)).count())?;
    resp::int(c.out, n.unwrap_or(0) as i64);
    done()
}

fn smembers(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let Some(set) = read::<Set>(c.store, arg(args, 1), c.now)? else {
        resp::array(c.out, 0);
        return done();
    };
    // The set's weight bounds its members' bytes; they are written without a copy.
    reserve_reply(c.out, set.len(), set.weight())?;
    resp::array(c.out, set.len());
    set.each_member(|m| resp::bulk(c.out, m));
    done()
}

fn sismember(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let found = read::<Set>(c.store, arg(args, 1), c.now)?.is_some_and(|s| s.contains(arg(args, 2)));
    resp::int(c.out, i64::from(found));
    done()
}

fn smismember(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let set = read::<Set>(c.store, arg(args, 1), c.now)?;
    resp::array(c.out, args.len() - 2);
    for m in args.iter().skip(2) {
        resp::int(c.out, i64::from(set.is_some_and(|s| s.contains(m))));
    }
    done()
}

fn scard(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let n = read::<Set>(c.store, arg(args, 1), c.now)?.map_or(0, Set::len);
    resp::int(c.out, n as i64);
    done()
}

/// SPOP key [count]: random members out.
fn spop(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let n = match args.len() {
        2 => None,
        3 => Some(count(arg(args, 2))?),
        _ => return Err(CommandError::Syntax),
    };
    let key = arg(args, 1);
    let mut picks: Vec<usize> = Vec::new();
    if let Some(set) = read::<Set>(c.store, key, c.now)? {
        // Room for the reply before anything leaves the set (its weight bounds the members).
        reserve_reply(c.out, n.unwrap_or(1).min(set.len()), set.weight())?;
        let len = set.len();
        let mut left = len;
        for _ in 0..n.unwrap_or(1).min(len) {
            picks.push(c.store.random_below(left));
            left -= 1;
        }
    }
    let popped = with(c.store, key, c.now, false, |s: &mut Set| {
        picks.iter().filter_map(|&i| s.take_nth(i)).collect::<Vec<_>>()
    })?;
    match (popped, n) {
        (None, None) => resp::null(c.out),
        (Some(items), None) => items.first().into_iter().for_each(|v| resp::bulk(c.out, v)),
        (items, Some(_)) => {
            let items = items.unwrap_or_default();
            resp::array(c.out, items.len());
            items.iter().for_each(|v| resp::bulk(c.out, v));
        }
    }
    done()
}

fn score_reply(out: &mut Vec<u8>, score: f64) {
    let mut text = Vec::with_capacity(24);
    types::format_score(score, &mut text);
    resp::bulk(out, &text);
}

fn float(a: &[u8]) -> Result<f64, CommandError> {
    types::parse_score(a).ok_or(CommandError::NotFloat)
}

/// What one ZADD/ZINCRBY element did.
enum Added {
    New(f64),
    Updated(f64),
    Same(f64),
    Skipped,
}

/// Redis's `zsetAdd`.
fn zset_add(z: &mut ZSet, m: Vec<u8>, mut score: f64, f: ZaddFlags) -> Result<Added, CommandError> {
    // Redis keeps small sorted sets in a listpack, whose scores go through `d2string`: -0
    // comes back as 0.
    if score == 0.0 {
        score = 0.0;
    }
    match z.score(&m) {
        Some(cur) => {
            if f.nx {
                return Ok(Added::Skipped);
            }
            if f.incr {
                score += cur;
                if score.is_nan() {
                    return Err(CommandError::ScoreNan);
                }
            }
            if (f.lt && score >= cur) || (f.gt && score <= cur) {
                return Ok(Added::Skipped);
            }
            if score == cur {
                return Ok(Added::Same(score));
            }
            z.insert(m, score);
            Ok(Added::Updated(score))
        }
        None if f.xx => Ok(Added::Skipped),
        None => {
            z.insert(m, score);
            Ok(Added::New(score))
        }
    }
}

#[derive(Clone, Copy, Default)]
struct ZaddFlags {
    nx: bool,
    xx: bool,
    gt: bool,
    lt: bool,
    ch: bool,
    incr: bool,
}

/// ZADD key [NX|XX] [GT|LT] [CH] [INCR] score member [score member ...].
fn zadd(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let mut f = ZaddFlags::default();
    let mut i = 2;
    while let Some(opt) = args.get(i) {
        match () {
            _ if is(opt, "nx") => f.nx = true,
            _ if is(opt, "xx") => f.xx = true,
            _ if is(opt, "gt") => f.gt = true,
            _ if is(opt, "lt") => f.lt = true,
            _ if is(opt, "ch") => f.ch = true,
            _ if is(opt, "incr") => f.incr = true,
            _ => break,
        }
        i += 1;
    }
    let elements = args.len() - i;
    if elements == 0 || !elements.is_multiple_of(2) {
        return Err(CommandError::Syntax);
    }
    if f.nx && f.xx {
        return Err(CommandError::ZaddXxNx);
    }
    if (f.nx && (f.gt || f.lt)) || (f.gt && f.lt) {
        return Err(CommandError::ZaddGtLtNx);
    }
    if f.incr && elements > 2 {
        return Err(CommandError::ZaddIncrPairs);
    }
    let scores = args.iter().skip(i).step_by(2).map(|a| float(a)).collect::<Result<Vec<f64>, _>>()?;
    let key = take(args, 1);
    let exists = read::<ZSet>(c.store, &key, c.now)?.is_some();
    let (mut added, mut changed, mut last) = (0, 0, None);
    if exists || !f.xx {
        let members = args.get_mut(i + 1..).unwrap_or_default().iter_mut().step_by(2);
        let r = with(c.store, &key, c.now, true, |z: &mut ZSet| {
            for (m, &s) in members.zip(&scores) {
                match zset_add(z, mem::take(m), s, f)? {
                    Added::New(s) => (added, last) = (added + 1, Some(s)),
                    Added::Updated(s) => (changed, last) = (changed + 1, Some(s)),
                    Added::Same(s) => last = Some(s),
                    Added::Skipped => {}
                }
            }
            Ok(())
        })?;
        if let Some(Err(e)) = r {
            return Err(e);
        }
    }
    if f.incr {
        match last {
            Some(s) => score_reply(c.out, s),
            None => resp::null(c.out),
        }
    } else {
        resp::int(c.out, added + if f.ch { changed } else { 0 });
    }
    done()
}

fn zincrby(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let by = float(arg(args, 2))?;
    let key = take(args, 1);
    let m = take(args, 3);
    let f = ZaddFlags { incr: true, ..ZaddFlags::default() };
    match with(c.store, &key, c.now, true, |z: &mut ZSet| zset_add(z, m, by, f))? {
        Some(Ok(Added::New(s) | Added::Updated(s) | Added::Same(s))) => score_reply(c.out, s),
        Some(Err(e)) => return Err(e),
        _ => resp::null(c.out),
    }
    done()
}

fn zscore(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    match read::<ZSet>(c.store, arg(args, 1), c.now)?.and_then(|z| z.score(arg(args, 2))) {
        Some(s) => score_reply(c.out, s),
        None => resp::null(c.out),
    }
    done()
}

fn zmscore(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let z = read::<ZSet>(c.store, arg(args, 1), c.now)?;
    resp::array(c.out, args.len() - 2);
    for m in args.iter().skip(2) {
        match z.and_then(|z| z.score(m)) {
            Some(s) => score_reply(c.out, s),
            None => resp::null(c.out),
        }
    }
    done()
}

fn zrem(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let members = args.get(2..).unwrap_or_default();
    let n = with(c.store, arg(args, 1), c.now, false, |z: &mut ZSet| members.iter().filter(|m| z.remove(m)).count())?;
    resp::int(c.out, n.unwrap_or(0) as i64);
    done()
}

fn zcard(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let n = read::<ZSet>(c.store, arg(args, 1), c.now)?.map_or(0, ZSet::len);
    resp::int(c.out, n as i64);
    done()
}

fn zrank(c: &mut Ctx<'_>, args: &mut [Vec<u8>], rev: bool) -> Result<Flow, CommandError> {
    let z = read::<ZSet>(c.store, arg(args, 1), c.now)?;
    match z.and_then(|z| z.rank(arg(args, 2)).map(|r| if rev { z.len() - 1 - r } else { r })) {
        Some(r) => resp::int(c.out, r as i64),
        None => resp::null(c.out),
    }
    done()
}

/// What a ZRANGE-family command ranges over and in which direction, before its options.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RangeBy {
    /// Not fixed by the command name (ZRANGE): options choose.
    Auto,
    Rank,
    Score,
}

/// ZRANGE key start stop [BYSCORE] [REV] [LIMIT offset count] [WITHSCORES], ZREVRANGE,
/// ZRANGEBYSCORE key min max [WITHSCORES] [LIMIT offset count] and ZREVRANGEBYSCORE key max
/// min …: Redis 7.0's `zrangeGenericCommand` (BYLEX is not supported: a syntax error).
fn zrange(c: &mut Ctx<'_>, args: &mut [Vec<u8>], by: RangeBy, rev: Option<bool>) -> Result<Flow, CommandError> {
    let (mut by, mut rev, mut withscores) = (by, rev, false);
    let (mut offset, mut limit) = (0i64, -1i64);
    let mut i = 4;
    while let Some(opt) = args.get(i) {
        let left = args.len() - i - 1;
        if is(opt, "withscores") {
            withscores = true;
        } else if is(opt, "limit") && left >= 2 {
            offset = integer(arg(args, i + 1))?;
            limit = integer(arg(args, i + 2))?;
            i += 2;
        } else if rev.is_none() && is(opt, "rev") {
            rev = Some(true);
        } else if by == RangeBy::Auto && is(opt, "byscore") {
            by = RangeBy::Score;
        } else {
            return Err(CommandError::Syntax);
        }
        i += 1;
    }
    let rev = rev.unwrap_or(false);
    if limit != -1 && by != RangeBy::Score {
        return Err(CommandError::LimitWithoutBy);
    }
    let (lo, hi) =
        if rev && by == RangeBy::Score { (arg(args, 3), arg(args, 2)) } else { (arg(args, 2), arg(args, 3)) };
    let items = if by == RangeBy::Score {
        let (lo, hi) = (score_bound(lo)?, score_bound(hi)?);
        let Some(z) = read::<ZSet>(c.store, arg(args, 1), c.now)? else {
            resp::array(c.out, 0);
            return done();
        };
        let skip = if offset < 0 { usize::MAX } else { usize::try_from(offset).unwrap_or(usize::MAX) };
        let take = if limit < 0 { usize::MAX } else { usize::try_from(limit).unwrap_or(usize::MAX) };
        z.by_score(lo, hi, rev).skip(skip).take(take).collect()
    } else {
        let (start, end) = (integer(lo)?, integer(hi)?);
        match read::<ZSet>(c.store, arg(args, 1), c.now)? {
            Some(z) => clamp_range(start, end, z.len()).map(|(s, e)| z.range(s, e, rev)).unwrap_or_default(),
            None => Vec::new(),
        }
    };
    reserve_reply(c.out, 2 * items.len(), items.iter().map(|(m, _)| m.len()).sum())?;
    resp::array(c.out, items.len() * if withscores { 2 } else { 1 });
    for (m, s) in items {
        resp::bulk(c.out, m);
        if withscores {
            score_reply(c.out, s);
        }
    }
    done()
}

/// A score range end as Redis's `zslParseRange`: `(x` excludes x.
fn score_bound(a: &[u8]) -> Result<(f64, bool), CommandError> {
    let (text, excl) = match a.strip_prefix(b"(") {
        Some(rest) => (rest, true),
        None => (a, false),
    };
    types::parse_score(text).map(|v| (v, excl)).ok_or(CommandError::MinMaxNotFloat)
}

/// ZCOUNT key min max.
fn zcount(c: &mut Ctx<'_>, args: &mut [Vec<u8>]) -> Result<Flow, CommandError> {
    let (lo, hi) = (score_bound(arg(args, 2))?, score_bound(arg(args, 3))?);
    let n = read::<ZSet>(c.store, arg(args, 1), c.now)?.map_or(0, |z| z.by_score(lo, hi, false).count());
    resp::int(c.out, n as i64);
    done()
}

/// ZPOPMIN/ZPOPMAX key [count]: member, score, … (an empty array for a missing key).
fn zpop(c: &mut Ctx<'_>, args: &mut [Vec<u8>], max: bool) -> Result<Flow, CommandError> {
    let n = match args.len() {
        2 => 1,
        3 => count(arg(args, 2))?,
        _ => return Err(CommandError::Syntax),
    };
    // Room for the reply before anything leaves the set: the members that will pop.
    if let Some(z) = read::<ZSet>(c.store, arg(args, 1), c.now)?
        && let Some(last) = n.min(z.len()).checked_sub(1)
    {
        reserve_reply(c.out, 2 * (last + 1), z.range(0, last, max).iter().map(|(m, _)| m.len()).sum())?;
    }
    let popped = with(c.store, arg(args, 1), c.now, false, |z: &mut ZSet| {
        (0..n.min(z.len())).filter_map(|_| z.pop(max)).collect::<Vec<_>>()
    })?
    .unwrap_or_default();
    resp::array(c.out, 2 * popped.len());
    for (m, s) in popped {
        resp::bulk(c.out, &m);
        score_reply(c.out, s);
    }
    done()
}
