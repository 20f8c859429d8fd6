//! The simulated Redis: a pure data model ([`Store`]) behind a RESP2/RESP3
//! connection layer ([`serve_connection`], [`serve_turmoil`]), so that the
//! real `redis` crate client runs unchanged against it inside turmoil.
//!
//! Layers, from the bottom:
//! - [`Store`] is synchronous and pure. It holds the keyspace, the pub/sub
//!   channel table and the outbox of published messages. It never reads a
//!   clock: every call takes `now`, the simulated time since the start.
//!   Per-connection state (protocol, MULTI queue, subscriptions) lives in a
//!   [`Session`] that the caller owns; [`Store::execute`] uses a built-in
//!   detached session for callers (and tests) without a connection.
//! - [`SharedRedis`] is the cloneable handle: the store behind a mutex, the
//!   injected clock, the per-client bounded push queues, the command log and
//!   the knobs the simulation turns from outside the host (`set_delay`,
//!   `flush_data`, `kill_all_clients`).
//! - [`serve_connection`] speaks RESP over any `AsyncRead + AsyncWrite`
//!   stream, decoding with `redis_protocol::resp2` and encoding with
//!   `redis_protocol::resp2` or `resp3` after `HELLO 3`.
//!
//! Keys, values, members and channels are bytes. Every collection is a
//! `BTreeMap`/`BTreeSet`, so every iteration order is deterministic.
//!
//! # Commands
//!
//! PING, ECHO, HELLO, CLIENT, SELECT, QUIT, FLUSHALL, FLUSHDB, DBSIZE, DEL,
//! EXISTS, TYPE, KEYS, GET, SET (NX, XX, GET, KEEPTTL, EX, PX, EXAT, PXAT),
//! SETNX, GETDEL, INCR, INCRBY, DECR, DECRBY, EXPIRE and PEXPIRE (NX, XX, GT,
//! LT), TTL, PTTL, PERSIST, SADD, SREM, SISMEMBER, SMEMBERS, SCARD, HSET,
//! HSETNX, HGET, HDEL, HGETALL, HLEN, HINCRBY, RPUSH, LPUSH, LRANGE, LLEN,
//! LTRIM, ZADD (NX, XX, GT, LT, CH, INCR), ZRANGEBYSCORE (WITHSCORES,
//! LIMIT), ZRANGE (index form, BYSCORE, REV, LIMIT, WITHSCORES), ZCOUNT,
//! ZREM, ZCARD, ZREMRANGEBYSCORE, ZREMRANGEBYRANK, ZSCORE, PUBLISH,
//! SUBSCRIBE, UNSUBSCRIBE, MULTI, EXEC, DISCARD, EVAL, EVALSHA, SCRIPT
//! (LOAD, EXISTS, FLUSH).
//! Argument parsing, arity checks, error texts and WRONGTYPE follow Redis
//! 7.0 (checked by `sim/tests/redis_differential.rs` against a real
//! `redis-server`).
//!
//! # Time and expiry
//!
//! The model's unix clock is [`UNIX_EPOCH_OFFSET`] (1 700 000 000 s, the
//! epoch the simulation pins turmoil to) plus `now`, at millisecond
//! resolution like Redis. A key with an expiry is expired when `now` is past
//! it (Redis's `now > when`). Every command first purges all expired keys
//! through an index ordered by expiry time, so an expired key is absent for
//! every command, including DBSIZE and KEYS, with no background task.
//!
//! # Deliberate deviations from Redis
//!
//! - Only database 0: `SELECT 1..15` is an error (Redis would switch).
//! - KEYS, SMEMBERS, HGETALL, UNSUBSCRIBE-all answer in sorted byte order;
//!   Redis's order is its hash table's (or insertion order for small
//!   hashes). Callers must not depend on either.
//! - DBSIZE never counts logically expired keys (Redis may, until its
//!   active expiry cycle reclaims them).
//! - CLIENT: `ID`, `GETNAME`, `SETNAME` behave; any other subcommand answers
//!   OK (Redis answers or errors per subcommand).
//! - HELLO accepts any `AUTH` credentials and answers a fixed map claiming
//!   version 7.0.15.
//! - No PSUBSCRIBE, WATCH, blocking commands or inline (telnet) commands:
//!   they are unknown commands (inline ones a protocol error).
//! - No Lua: EVAL, EVALSHA and SCRIPT LOAD run only the scripts listed in
//!   [`crate::redis_scripts`], natively; any other script is an error. An
//!   error inside a script answers the failing command's own error (Redis
//!   appends the script's name and line).
//! - ZRANGE BYLEX is not supported (an error).
//! - Float parsing accepts what Rust's `f64` parser does, which differs from
//!   C `strtod` only in exotic forms (hexadecimal floats, `nan(...)`).
//! - The unknown-command error lists its arguments like Redis but may differ
//!   in truncation details.
//! - `-0` scores are stored as `0` (Redis's small sorted sets do the same).
//! - Protocol errors (malformed RESP, or a request above
//!   [`Limits::request_bytes_max`], 16 MiB by default instead of Redis's
//!   512 MiB) answer `-ERR Protocol error: ...` and close, like Redis.
//! - A subscriber whose push queue ([`Limits::push_queue_len_max`]
//!   messages) overflows is disconnected at once, like Redis's
//!   `client-output-buffer-limit pubsub`, but counted in messages, not bytes.
//! - [`SharedRedis::set_delay`] delays the replies to each batch of commands
//!   read together, by executing them only after the delay.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use redis_protocol::bytes_utils::Str;
use redis_protocol::resp2::types::{BytesFrame as Resp2Frame, Resp2Frame as _};
use redis_protocol::resp3::types::{BytesFrame as Resp3Frame, FrameMap, FrameSet};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};

use crate::redis_scripts;

/// The model's unix time at simulated time zero (1 700 000 000 s, the epoch
/// the simulation pins turmoil to). Only EXAT/PXAT and expiry-overflow
/// errors can observe it.
pub const UNIX_EPOCH_OFFSET: Duration = Duration::from_secs(1_700_000_000);

const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";
const NOT_INTEGER: &str = "ERR value is not an integer or out of range";
const NOT_FLOAT: &str = "ERR value is not a valid float";
const SYNTAX: &str = "ERR syntax error";
const RANGE_NOT_FLOAT: &str = "ERR min or max is not a float";
const UNKNOWN_SCRIPT: &str =
    "ERR the imsim Redis model has no native version of this script (see redis_scripts)";
const SUBSCRIBED_CONTEXT: &str =
    "only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context";

// ---------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------

/// One reply, independent of the protocol version; the connection layer
/// encodes it as RESP2 or RESP3.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// `+OK`-style status.
    Status(Bytes),
    /// `-CODE message`; the text starts with the error code (`ERR`,
    /// `WRONGTYPE`, `EXECABORT`, `NOPROTO`).
    Error(String),
    /// `:n`.
    Integer(i64),
    /// A bulk string, or nil (`$-1` in RESP2, `_` in RESP3).
    Bulk(Option<Bytes>),
    /// An array, or a nil array (`*-1` in RESP2, `_` in RESP3).
    Array(Option<Vec<Reply>>),
    /// A double: a bulk string formatted like C's `%.17g` in RESP2, `,` in
    /// RESP3.
    Double(f64),
    /// A set: an array in RESP2, `~` in RESP3.
    Set(Vec<Reply>),
    /// A map: a flat array of keys and values in RESP2, `%` in RESP3.
    Map(Vec<(Reply, Reply)>),
    /// A reply preceded on the wire by pushes to the calling client (a
    /// RESP3 subscriber publishing to its own channel: Redis writes the
    /// message before the reply, even inside EXEC's array, where it is not
    /// counted as an element).
    AfterPushes(Vec<Reply>, Box<Reply>),
    /// Pairs such as member/score: a flat array in RESP2, an array of
    /// two-element arrays in RESP3 (ZRANGE ... WITHSCORES).
    Pairs(Vec<(Reply, Reply)>),
    /// Out-of-band data: an array in RESP2, `>` in RESP3.
    Push(Vec<Reply>),
    /// Several top-level replies to one command (SUBSCRIBE a b answers one
    /// confirmation per channel).
    Frames(Vec<Reply>),
}

impl Reply {
    /// `+OK`.
    pub fn ok() -> Reply {
        Reply::Status(Bytes::from_static(b"OK"))
    }

    /// An error reply; `text` starts with the error code.
    pub fn error(text: impl Into<String>) -> Reply {
        Reply::Error(text.into())
    }

    /// A bulk string.
    pub fn bulk(b: impl Into<Bytes>) -> Reply {
        Reply::Bulk(Some(b.into()))
    }

    /// The nil bulk string.
    pub fn nil() -> Reply {
        Reply::Bulk(None)
    }

    /// Whether this is an error reply.
    pub fn is_error(&self) -> bool {
        matches!(self, Reply::Error(_))
    }

    fn bulks(items: impl IntoIterator<Item = Bytes>) -> Reply {
        Reply::Array(Some(
            items.into_iter().map(|b| Reply::Bulk(Some(b))).collect(),
        ))
    }

    /// Appends the RESP encoding of this reply to `out`.
    pub fn encode(&self, resp3: bool, out: &mut BytesMut) {
        if let Reply::Frames(frames) = self {
            for f in frames {
                f.encode(resp3, out);
            }
            return;
        }
        if let Reply::AfterPushes(pushes, reply) = self {
            for p in pushes {
                p.encode(resp3, out);
            }
            reply.encode(resp3, out);
            return;
        }
        if let Reply::Array(Some(items)) = self
            && items.iter().any(|i| matches!(i, Reply::AfterPushes(..)))
        {
            out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
            for item in items {
                item.encode(resp3, out);
            }
            return;
        }
        // Encoding only fails for frames that cannot be built from a Reply
        // (attributes, streamed types), so a failure is a programmer error.
        if resp3 {
            redis_protocol::resp3::encode::complete::extend_encode(out, &self.to_resp3(), false)
                .expect("encode RESP3 reply");
        } else {
            redis_protocol::resp2::encode::extend_encode(out, &self.to_resp2(), false)
                .expect("encode RESP2 reply");
        }
    }

    fn to_resp2(&self) -> Resp2Frame {
        match self {
            Reply::Status(s) => Resp2Frame::SimpleString(s.clone()),
            Reply::Error(e) => Resp2Frame::Error(Str::from(one_line(e))),
            Reply::Integer(n) => Resp2Frame::Integer(*n),
            Reply::Bulk(Some(b)) => Resp2Frame::BulkString(b.clone()),
            Reply::Bulk(None) | Reply::Array(None) => Resp2Frame::Null,
            Reply::Double(d) => Resp2Frame::BulkString(Bytes::from(format_double(*d))),
            Reply::Array(Some(items))
            | Reply::Set(items)
            | Reply::Push(items)
            | Reply::Frames(items) => {
                Resp2Frame::Array(items.iter().map(Reply::to_resp2).collect())
            }
            // Only an element of EXEC's array or a top-level reply carries
            // pushes; `encode` writes those itself.
            Reply::AfterPushes(_, reply) => reply.to_resp2(),
            Reply::Map(pairs) | Reply::Pairs(pairs) => Resp2Frame::Array(
                pairs
                    .iter()
                    .flat_map(|(k, v)| [k.to_resp2(), v.to_resp2()])
                    .collect(),
            ),
        }
    }

    fn to_resp3(&self) -> Resp3Frame {
        match self {
            Reply::Status(s) => Resp3Frame::SimpleString {
                data: s.clone(),
                attributes: None,
            },
            Reply::Error(e) => Resp3Frame::SimpleError {
                data: Str::from(one_line(e)),
                attributes: None,
            },
            Reply::Integer(n) => Resp3Frame::Number {
                data: *n,
                attributes: None,
            },
            Reply::Bulk(Some(b)) => Resp3Frame::BlobString {
                data: b.clone(),
                attributes: None,
            },
            Reply::Bulk(None) | Reply::Array(None) => Resp3Frame::Null,
            Reply::Double(d) => Resp3Frame::Double {
                data: *d,
                attributes: None,
            },
            Reply::Array(Some(items)) | Reply::Frames(items) => Resp3Frame::Array {
                data: items.iter().map(Reply::to_resp3).collect(),
                attributes: None,
            },
            Reply::AfterPushes(_, reply) => reply.to_resp3(),
            Reply::Set(items) => {
                let mut set = FrameSet::default();
                for item in items {
                    set.insert(item.to_resp3());
                }
                Resp3Frame::Set {
                    data: set,
                    attributes: None,
                }
            }
            Reply::Map(pairs) => {
                let mut map = FrameMap::default();
                for (k, v) in pairs {
                    map.insert(k.to_resp3(), v.to_resp3());
                }
                Resp3Frame::Map {
                    data: map,
                    attributes: None,
                }
            }
            Reply::Pairs(pairs) => Resp3Frame::Array {
                data: pairs
                    .iter()
                    .map(|(k, v)| Resp3Frame::Array {
                        data: vec![k.to_resp3(), v.to_resp3()],
                        attributes: None,
                    })
                    .collect(),
                attributes: None,
            },
            Reply::Push(items) => Resp3Frame::Push {
                data: items.iter().map(Reply::to_resp3).collect(),
                attributes: None,
            },
        }
    }
}

/// RESP errors and statuses are single lines.
fn one_line(s: &str) -> String {
    s.replace(['\r', '\n'], " ")
}

/// Formats like C's `printf("%.17g")`, which Redis 7.0 uses for doubles in
/// RESP2 (`0.1` is `0.10000000000000001`), with Redis's `inf`/`-inf`.
pub fn format_double(x: f64) -> String {
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.to_string();
    }
    if x.is_nan() {
        return "nan".to_string();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0" } else { "0" }.to_string();
    }
    const PRECISION: i32 = 17;
    let sci = format!("{:.*e}", (PRECISION - 1) as usize, x);
    let (mantissa, exp) = sci.split_once('e').expect("{:e} output has an exponent");
    let exp: i32 = exp.parse().expect("{:e} exponent is an integer");
    let sign = if mantissa.starts_with('-') { "-" } else { "" };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let trim = |s: String| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    if !(-4..PRECISION).contains(&exp) {
        let m = trim(format!("{}.{}", &digits[..1], &digits[1..]));
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{esign}{:02}", exp.abs())
    } else if exp >= 0 {
        let split = exp as usize + 1;
        let m = trim(format!("{}.{}", &digits[..split], &digits[split..]));
        format!("{sign}{m}")
    } else {
        let zeros = "0".repeat((-exp - 1) as usize);
        let m = trim(format!("0.{zeros}{digits}"));
        format!("{sign}{m}")
    }
}

// ---------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------

/// A copy of one key's value, for checkers reading the final state.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A string.
    String(Bytes),
    /// A list, head first.
    List(Vec<Bytes>),
    /// A set.
    Set(BTreeSet<Bytes>),
    /// A hash.
    Hash(BTreeMap<Bytes, Bytes>),
    /// A sorted set, in score order (ties by member).
    ZSet(Vec<(Bytes, f64)>),
}

/// A copy of one key: its value and its expiry in simulated time.
#[derive(Clone, Debug, PartialEq)]
pub struct KeySnapshot {
    /// The value.
    pub value: Value,
    /// When the key expires, as simulated time since the start; `None`
    /// when it is persistent.
    pub expires_at: Option<Duration>,
}

/// A score, totally ordered (NaN never gets stored).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Score(f64);

impl Eq for Score {}

impl PartialOrd for Score {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Score {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0
            .partial_cmp(&other.0)
            .unwrap_or(std::cmp::Ordering::Equal)
    }
}

#[derive(Clone, Debug, Default)]
struct ZSet {
    by_member: BTreeMap<Bytes, f64>,
    by_score: BTreeSet<(Score, Bytes)>,
}

impl ZSet {
    fn len(&self) -> usize {
        self.by_member.len()
    }

    fn score(&self, member: &[u8]) -> Option<f64> {
        self.by_member.get(member).copied()
    }

    /// Inserts or updates; returns whether the member is new.
    fn insert(&mut self, member: Bytes, score: f64) -> bool {
        // Small sorted sets in Redis store -0 as the integer 0.
        let score = if score == 0.0 { 0.0 } else { score };
        let old = self.by_member.insert(member.clone(), score);
        if let Some(old) = old {
            self.by_score.remove(&(Score(old), member.clone()));
        }
        self.by_score.insert((Score(score), member));
        old.is_none()
    }

    fn remove(&mut self, member: &Bytes) -> bool {
        match self.by_member.remove(member) {
            Some(old) => {
                self.by_score.remove(&(Score(old), member.clone()));
                true
            }
            None => false,
        }
    }

    fn iter(&self) -> impl DoubleEndedIterator<Item = (&Bytes, f64)> {
        self.by_score.iter().map(|(s, m)| (m, s.0))
    }
}

/// A score interval as ZRANGEBYSCORE takes it: `(` makes a bound exclusive.
#[derive(Clone, Copy, Debug)]
struct ScoreRange {
    min: f64,
    min_exclusive: bool,
    max: f64,
    max_exclusive: bool,
}

impl ScoreRange {
    fn parse(min: &[u8], max: &[u8]) -> Option<ScoreRange> {
        let bound = |b: &[u8]| -> Option<(f64, bool)> {
            match b.strip_prefix(b"(") {
                Some(rest) => parse_f64_lenient(rest).map(|v| (v, true)),
                None => parse_f64_lenient(b).map(|v| (v, false)),
            }
        };
        let (min, min_exclusive) = bound(min)?;
        let (max, max_exclusive) = bound(max)?;
        Some(ScoreRange {
            min,
            min_exclusive,
            max,
            max_exclusive,
        })
    }

    fn contains(&self, s: f64) -> bool {
        let above = if self.min_exclusive {
            s > self.min
        } else {
            s >= self.min
        };
        let below = if self.max_exclusive {
            s < self.max
        } else {
            s <= self.max
        };
        above && below
    }
}

/// The stored object of a key (Redis's `robj`).
#[derive(Clone, Debug)]
enum Object {
    String(Bytes),
    List(VecDeque<Bytes>),
    Set(BTreeSet<Bytes>),
    Hash(BTreeMap<Bytes, Bytes>),
    ZSet(ZSet),
}

impl Object {
    fn type_name(&self) -> &'static str {
        match self {
            Object::String(_) => "string",
            Object::List(_) => "list",
            Object::Set(_) => "set",
            Object::Hash(_) => "hash",
            Object::ZSet(_) => "zset",
        }
    }

    /// Collections vanish when they become empty; strings never do.
    fn is_empty_collection(&self) -> bool {
        match self {
            Object::String(_) => false,
            Object::List(l) => l.is_empty(),
            Object::Set(s) => s.is_empty(),
            Object::Hash(h) => h.is_empty(),
            Object::ZSet(z) => z.len() == 0,
        }
    }

    fn to_value(&self) -> Value {
        match self {
            Object::String(s) => Value::String(s.clone()),
            Object::List(l) => Value::List(l.iter().cloned().collect()),
            Object::Set(s) => Value::Set(s.clone()),
            Object::Hash(h) => Value::Hash(h.clone()),
            Object::ZSet(z) => Value::ZSet(z.iter().map(|(m, s)| (m.clone(), s)).collect()),
        }
    }
}

/// Typed access to an [`Object`] variant, so one helper per access pattern
/// serves every type (and answers WRONGTYPE in one place).
trait Kind: Default {
    fn wrap(self) -> Object;
    fn peek(o: &Object) -> Option<&Self>;
    fn peek_mut(o: &mut Object) -> Option<&mut Self>;
}

macro_rules! kind {
    ($t:ty, $variant:ident) => {
        impl Kind for $t {
            fn wrap(self) -> Object {
                Object::$variant(self)
            }
            fn peek(o: &Object) -> Option<&Self> {
                match o {
                    Object::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn peek_mut(o: &mut Object) -> Option<&mut Self> {
                match o {
                    Object::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}

kind!(Bytes, String);
kind!(VecDeque<Bytes>, List);
kind!(BTreeSet<Bytes>, Set);
kind!(BTreeMap<Bytes, Bytes>, Hash);
kind!(ZSet, ZSet);

#[derive(Clone, Debug)]
struct Entry {
    object: Object,
    /// Unix milliseconds in the model's clock.
    expires_at_ms: Option<i64>,
}

// ---------------------------------------------------------------------------
// Sessions and pub/sub
// ---------------------------------------------------------------------------

/// A connection's identity (Redis's client id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientId(pub u64);

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client#{}", self.0)
    }
}

/// Per-connection state: protocol version, MULTI queue, subscriptions.
#[derive(Clone, Debug)]
pub struct Session {
    id: ClientId,
    resp3: bool,
    name: Option<Bytes>,
    multi: Option<Multi>,
    subscriptions: BTreeSet<Bytes>,
    quit: bool,
}

#[derive(Clone, Debug, Default)]
struct Multi {
    queued: Vec<Vec<Bytes>>,
    /// A command failed to queue (unknown, wrong arity): EXEC aborts.
    failed: bool,
}

impl Session {
    /// A fresh RESP2 session.
    pub fn new(id: ClientId) -> Session {
        Session {
            id,
            resp3: false,
            name: None,
            multi: None,
            subscriptions: BTreeSet::new(),
            quit: false,
        }
    }

    /// This session's client id.
    pub fn id(&self) -> ClientId {
        self.id
    }

    /// Whether `HELLO 3` switched this session to RESP3.
    pub fn is_resp3(&self) -> bool {
        self.resp3
    }

    /// Whether a MULTI is open.
    pub fn in_multi(&self) -> bool {
        self.multi.is_some()
    }

    /// The channels this session is subscribed to.
    pub fn subscriptions(&self) -> &BTreeSet<Bytes> {
        &self.subscriptions
    }

    /// Whether the client sent QUIT: the connection closes after the reply.
    pub fn wants_close(&self) -> bool {
        self.quit
    }

    /// RESP2 clients with subscriptions may only (un)subscribe and ping.
    fn in_subscribed_context(&self) -> bool {
        !self.resp3 && !self.subscriptions.is_empty()
    }
}

/// A message PUBLISH produced for one subscriber, waiting in
/// [`Store::take_deliveries`] until the connection layer queues it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The subscriber.
    pub client: ClientId,
    /// The channel published to.
    pub channel: Bytes,
    /// The message.
    pub payload: Bytes,
}

// ---------------------------------------------------------------------------
// Parsing helpers
// ---------------------------------------------------------------------------

/// Redis's `string2ll`: an optional `-`, no `+`, no leading zeros, no
/// spaces, in range.
pub fn parse_i64(b: &[u8]) -> Option<i64> {
    if b.is_empty() || b.len() > 20 {
        return None;
    }
    if b == b"0" {
        return Some(0);
    }
    let (negative, digits) = match b.strip_prefix(b"-") {
        Some(rest) => (true, rest),
        None => (false, b),
    };
    match digits.first() {
        Some(b'1'..=b'9') => {}
        _ => return None,
    }
    let mut v: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    if negative {
        if v > i64::MAX as u64 + 1 {
            None
        } else {
            Some((v as i64).wrapping_neg())
        }
    } else {
        i64::try_from(v).ok()
    }
}

/// Redis's `getDoubleFromObject`: no leading space, no NaN, no overflow to
/// infinity or underflow to zero (the literal `inf` is fine).
fn parse_f64(b: &[u8]) -> Option<f64> {
    let s = std::str::from_utf8(b).ok()?;
    if s.is_empty() || s.starts_with(|c: char| c.is_ascii_whitespace()) {
        return None;
    }
    let v: f64 = s.parse().ok()?;
    if v.is_nan() {
        return None;
    }
    let unsigned = s.trim_start_matches(['+', '-']).to_ascii_lowercase();
    if v.is_infinite() && unsigned != "inf" && unsigned != "infinity" {
        return None;
    }
    if v == 0.0 {
        let mantissa = unsigned.split('e').next().unwrap_or("");
        if mantissa.bytes().any(|c| (b'1'..=b'9').contains(&c)) {
            return None;
        }
    }
    Some(v)
}

/// Redis's `zslParseRange` bound: `strtod` skipping leading spaces, only
/// NaN rejected. An empty bound (`''` or a bare `(`) is 0: `strtod` reads
/// nothing and stops at the terminating NUL, which Redis takes as success.
fn parse_f64_lenient(b: &[u8]) -> Option<f64> {
    if b.is_empty() {
        return Some(0.0);
    }
    let s = std::str::from_utf8(b).ok()?.trim_start();
    let v: f64 = s.parse().ok()?;
    (!v.is_nan()).then_some(v)
}

/// Redis's `stringmatchlen` glob: `*`, `?`, `[abc]`, `[^a-z]`, `\x`.
pub fn glob_match(pattern: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    // Where to resume after the last `*`: (pattern index, string index).
    let mut star: Option<(usize, usize)> = None;
    loop {
        if p < pattern.len() && pattern[p] == b'*' {
            while p < pattern.len() && pattern[p] == b'*' {
                p += 1;
            }
            if p == pattern.len() {
                return true;
            }
            star = Some((p, i));
            continue;
        }
        if i == s.len() {
            return p == pattern.len();
        }
        if p < pattern.len() {
            let (matched, next) = glob_one(pattern, p, s[i]);
            if matched {
                p = next;
                i += 1;
                continue;
            }
        }
        match star {
            Some((sp, si)) => {
                p = sp;
                i = si + 1;
                star = Some((sp, si + 1));
            }
            None => return false,
        }
    }
}

/// Matches one pattern token at `p` (not `*`) against byte `c`; returns
/// whether it matched and the index after the token.
fn glob_one(pattern: &[u8], p: usize, c: u8) -> (bool, usize) {
    match pattern[p] {
        b'?' => (true, p + 1),
        b'\\' if p + 1 < pattern.len() => (pattern[p + 1] == c, p + 2),
        b'[' => {
            let mut j = p + 1;
            let negate = j < pattern.len() && pattern[j] == b'^';
            if negate {
                j += 1;
            }
            let mut matched = false;
            while j < pattern.len() && pattern[j] != b']' {
                if pattern[j] == b'\\' && j + 1 < pattern.len() {
                    matched |= pattern[j + 1] == c;
                    j += 2;
                } else if j + 2 < pattern.len() && pattern[j + 1] == b'-' {
                    let (a, b) = (pattern[j], pattern[j + 2]);
                    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
                    matched |= (lo..=hi).contains(&c);
                    j += 3;
                } else {
                    matched |= pattern[j] == c;
                    j += 1;
                }
            }
            // Skip the closing `]`; an unterminated class ends the pattern.
            let next = (j + 1).min(pattern.len());
            (matched != negate, next)
        }
        literal => (literal == c, p + 1),
    }
}

fn eq_ignore_case(arg: &[u8], word: &str) -> bool {
    arg.eq_ignore_ascii_case(word.as_bytes())
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Normalises LRANGE/ZRANGE indexes; `None` when the range is empty.
fn index_range(start: i64, stop: i64, len: usize) -> Option<(usize, usize)> {
    let len = len as i64;
    let mut start = if start < 0 { start + len } else { start };
    let mut stop = if stop < 0 { stop + len } else { stop };
    if start < 0 {
        start = 0;
    }
    if start > stop || start >= len {
        return None;
    }
    if stop >= len {
        stop = len - 1;
    }
    Some((start as usize, stop as usize))
}

// ---------------------------------------------------------------------------
// Command table
// ---------------------------------------------------------------------------

/// Redis's arity convention: `n > 0` exactly n arguments (with the command
/// name), `n < 0` at least -n.
fn arity(name: &str) -> Option<i32> {
    Some(match name {
        "PING" => -1,
        "ECHO" => 2,
        "HELLO" => -1,
        "CLIENT" => -2,
        "SELECT" => 2,
        "QUIT" => -1,
        "FLUSHALL" | "FLUSHDB" => -1,
        "DBSIZE" => 1,
        "DEL" | "EXISTS" => -2,
        "TYPE" | "KEYS" => 2,
        "GET" | "GETDEL" | "INCR" | "DECR" => 2,
        "SET" => -3,
        "SETNX" | "INCRBY" | "DECRBY" => 3,
        "EXPIRE" | "PEXPIRE" => -3,
        "TTL" | "PTTL" | "PERSIST" => 2,
        "SADD" | "SREM" => -3,
        "SISMEMBER" => 3,
        "SMEMBERS" | "SCARD" => 2,
        "HSET" => -4,
        "HGET" => 3,
        "HSETNX" | "HINCRBY" => 4,
        "HDEL" => -3,
        "HGETALL" | "HLEN" => 2,
        "RPUSH" | "LPUSH" => -3,
        "LRANGE" | "LTRIM" => 4,
        "LLEN" => 2,
        "ZADD" | "ZRANGEBYSCORE" | "ZRANGE" => -4,
        "ZREM" => -3,
        "ZCARD" => 2,
        "ZCOUNT" | "ZREMRANGEBYSCORE" | "ZREMRANGEBYRANK" => 4,
        "EVAL" | "EVALSHA" => -3,
        "SCRIPT" => -2,
        "ZSCORE" => 3,
        "PUBLISH" => 3,
        "SUBSCRIBE" => -2,
        "UNSUBSCRIBE" => -1,
        "MULTI" | "EXEC" | "DISCARD" => 1,
        _ => return None,
    })
}

fn arity_ok(arity: i32, argc: usize) -> bool {
    let argc = argc as i64;
    let arity = i64::from(arity);
    if arity >= 0 {
        argc == arity
    } else {
        argc >= -arity
    }
}

fn arity_error(name: &str) -> Reply {
    Reply::error(format!(
        "ERR wrong number of arguments for '{}' command",
        name.to_ascii_lowercase()
    ))
}

fn unknown_command(args: &[Bytes]) -> Reply {
    let mut listed = String::new();
    for a in &args[1..] {
        if listed.len() >= 128 {
            break;
        }
        let room = 128 - listed.len();
        let text = lossy(a);
        let text: String = text.chars().take(room).collect();
        listed.push_str(&format!("'{text}' "));
    }
    let name: String = lossy(&args[0]).chars().take(128).collect();
    Reply::error(format!(
        "ERR unknown command '{name}', with args beginning with: {listed}"
    ))
}

// ---------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------

/// The pure Redis model: keyspace, channel table, outbox of deliveries.
#[derive(Debug)]
pub struct Store {
    db: BTreeMap<Bytes, Entry>,
    /// Every key with an expiry, ordered by (unix ms, key).
    expiries: BTreeSet<(i64, Bytes)>,
    channels: BTreeMap<Bytes, BTreeSet<ClientId>>,
    deliveries: Vec<Delivery>,
    /// The session [`Store::execute`] runs in.
    detached: Session,
    /// Commands executed since the last drain, when someone drains them
    /// ([`SharedRedis`] does, for its command log); off otherwise, so a
    /// bare `Store` buffers nothing.
    journal: Option<Vec<Executed>>,
    /// The script cache: SHA1s loaded by EVAL or SCRIPT LOAD. Like
    /// Redis's, it survives FLUSHALL but not a restart
    /// ([`SharedRedis::lose_script_cache`]).
    script_cache: BTreeSet<String>,
}

/// One command as [`Store`] executed it (not as a client sent it: queued
/// commands appear at EXEC, rejected ones never).
#[derive(Debug)]
struct Executed {
    client: ClientId,
    args: Vec<Bytes>,
    failed: bool,
}

impl Default for Store {
    fn default() -> Self {
        Store::new()
    }
}

fn unix_ms(now: Duration) -> i64 {
    i64::try_from((UNIX_EPOCH_OFFSET + now).as_millis()).unwrap_or(i64::MAX)
}

fn sim_time(unix_ms: i64) -> Duration {
    let offset = UNIX_EPOCH_OFFSET.as_millis() as i64;
    Duration::from_millis(u64::try_from(unix_ms - offset).unwrap_or(0))
}

type CmdResult = Result<Reply, Reply>;

/// `redis.call` for a native script: commands run in the calling session,
/// at the calling command's time.
struct ScriptContext<'a> {
    store: &'a mut Store,
    session: &'a mut Session,
    now: i64,
}

impl redis_scripts::Call for ScriptContext<'_> {
    fn call(&mut self, args: &[&[u8]]) -> Result<Reply, Reply> {
        let args: Vec<Bytes> = args.iter().map(|a| Bytes::copy_from_slice(a)).collect();
        let name = lossy(&args[0]).to_ascii_uppercase();
        let reply = match arity(&name) {
            None => unknown_command(&args),
            Some(n) if !arity_ok(n, args.len()) => arity_error(&name),
            Some(_) => self.store.dispatch(self.session, self.now, &name, &args),
        };
        if reply.is_error() {
            Err(reply)
        } else {
            Ok(reply)
        }
    }
}

impl Store {
    /// An empty store.
    pub fn new() -> Store {
        Store {
            db: BTreeMap::new(),
            expiries: BTreeSet::new(),
            channels: BTreeMap::new(),
            deliveries: Vec::new(),
            detached: Session::new(ClientId(0)),
            journal: None,
            script_cache: BTreeSet::new(),
        }
    }

    /// Runs one command as the store's detached client (id 0), whose
    /// session persists across calls (so MULTI ... EXEC works).
    pub fn execute(&mut self, now: Duration, args: &[Bytes]) -> Reply {
        let mut session = std::mem::replace(&mut self.detached, Session::new(ClientId(0)));
        let reply = self.execute_in(&mut session, now, args);
        self.detached = session;
        reply
    }

    /// Runs one command for `session` at simulated time `now`.
    pub fn execute_in(&mut self, session: &mut Session, now: Duration, args: &[Bytes]) -> Reply {
        let now_ms = unix_ms(now);
        self.purge_expired(now_ms);
        let Some(first) = args.first() else {
            return Reply::error("ERR empty command");
        };
        let name = lossy(first).to_ascii_uppercase();
        let flag_multi = |session: &mut Session| {
            if let Some(m) = &mut session.multi {
                m.failed = true;
            }
        };
        let Some(arity) = arity(&name) else {
            flag_multi(session);
            return unknown_command(args);
        };
        if !arity_ok(arity, args.len()) {
            flag_multi(session);
            return arity_error(&name);
        }
        if session.in_subscribed_context()
            && !matches!(name.as_str(), "SUBSCRIBE" | "UNSUBSCRIBE" | "PING" | "QUIT")
        {
            flag_multi(session);
            let lower = name.to_ascii_lowercase();
            return if name == "EXEC" {
                session.multi = None;
                Reply::error(format!(
                    "EXECABORT Transaction discarded because of: Can't execute '{lower}': {SUBSCRIBED_CONTEXT}"
                ))
            } else {
                Reply::error(format!("ERR Can't execute '{lower}': {SUBSCRIBED_CONTEXT}"))
            };
        }
        match name.as_str() {
            "MULTI" => {
                if session.multi.is_some() {
                    Reply::error("ERR MULTI calls can not be nested")
                } else {
                    session.multi = Some(Multi::default());
                    Reply::ok()
                }
            }
            "EXEC" => match session.multi.take() {
                None => Reply::error("ERR EXEC without MULTI"),
                Some(m) if m.failed => {
                    Reply::error("EXECABORT Transaction discarded because of previous errors.")
                }
                Some(m) => {
                    let mut replies = Vec::with_capacity(m.queued.len());
                    for cmd in &m.queued {
                        let name = lossy(&cmd[0]).to_ascii_uppercase();
                        match self.dispatch(session, now_ms, &name, cmd) {
                            Reply::Frames(frames) => replies.extend(frames),
                            reply => replies.push(reply),
                        }
                    }
                    Reply::Array(Some(replies))
                }
            },
            "DISCARD" => match session.multi.take() {
                None => Reply::error("ERR DISCARD without MULTI"),
                Some(_) => Reply::ok(),
            },
            _ if session.multi.is_some() && name != "QUIT" => {
                if let Some(m) = &mut session.multi {
                    m.queued.push(args.to_vec());
                }
                Reply::Status(Bytes::from_static(b"QUEUED"))
            }
            _ => self.dispatch(session, now_ms, &name, args),
        }
    }

    /// Forgets a disconnected client's subscriptions.
    pub fn disconnect(&mut self, client: ClientId) {
        self.channels.retain(|_, subscribers| {
            subscribers.remove(&client);
            !subscribers.is_empty()
        });
    }

    /// The messages PUBLISH produced since the last call, in order.
    pub fn take_deliveries(&mut self) -> Vec<Delivery> {
        std::mem::take(&mut self.deliveries)
    }

    /// Drops every key (FLUSHALL); subscriptions stay.
    pub fn flush(&mut self) {
        self.db.clear();
        self.expiries.clear();
    }

    /// The live keys at `now`, sorted.
    pub fn keys(&mut self, now: Duration) -> Vec<Bytes> {
        self.purge_expired(unix_ms(now));
        self.db.keys().cloned().collect()
    }

    /// A copy of every live key at `now`.
    pub fn snapshot(&mut self, now: Duration) -> BTreeMap<Bytes, KeySnapshot> {
        self.purge_expired(unix_ms(now));
        self.db
            .iter()
            .map(|(k, e)| {
                let snap = KeySnapshot {
                    value: e.object.to_value(),
                    expires_at: e.expires_at_ms.map(sim_time),
                };
                (k.clone(), snap)
            })
            .collect()
    }

    /// A copy of `key`'s value at `now`, if it is live.
    pub fn value(&mut self, now: Duration, key: &[u8]) -> Option<Value> {
        self.purge_expired(unix_ms(now));
        self.db.get(key).map(|e| e.object.to_value())
    }

    /// The number of subscribers of `channel`.
    pub fn subscriber_count(&self, channel: &[u8]) -> usize {
        self.channels.get(channel).map_or(0, BTreeSet::len)
    }

    /// Every channel with at least one subscriber, sorted.
    pub fn subscribed_channels(&self) -> Vec<Bytes> {
        self.channels.keys().cloned().collect()
    }

    // --- keyspace primitives ------------------------------------------------

    fn purge_expired(&mut self, now_ms: i64) {
        while let Some((at, _)) = self.expiries.first() {
            if *at >= now_ms {
                break;
            }
            if let Some((_, key)) = self.expiries.pop_first() {
                self.db.remove(&key);
            }
        }
    }

    fn remove(&mut self, key: &Bytes) -> Option<Entry> {
        let entry = self.db.remove(key)?;
        if let Some(at) = entry.expires_at_ms {
            self.expiries.remove(&(at, key.clone()));
        }
        Some(entry)
    }

    fn set_expiry(&mut self, key: &Bytes, at: Option<i64>) {
        let Some(entry) = self.db.get_mut(key) else {
            return;
        };
        if let Some(old) = std::mem::replace(&mut entry.expires_at_ms, at) {
            self.expiries.remove(&(old, key.clone()));
        }
        if let Some(at) = at {
            self.expiries.insert((at, key.clone()));
        }
    }

    fn expiry(&self, key: &[u8]) -> Option<i64> {
        self.db.get(key).and_then(|e| e.expires_at_ms)
    }

    /// Stores a new object, dropping any old value and TTL unless
    /// `keep_ttl`.
    fn put(&mut self, key: &Bytes, object: Object, keep_ttl: bool) {
        match self.db.get_mut(key) {
            Some(entry) if keep_ttl => entry.object = object,
            _ => {
                self.remove(key);
                self.db.insert(
                    key.clone(),
                    Entry {
                        object,
                        expires_at_ms: None,
                    },
                );
            }
        }
    }

    fn read<T: Kind>(&self, key: &[u8]) -> Result<Option<&T>, Reply> {
        match self.db.get(key) {
            None => Ok(None),
            Some(e) => T::peek(&e.object)
                .map(Some)
                .ok_or_else(|| Reply::error(WRONGTYPE)),
        }
    }

    fn write<T: Kind>(&mut self, key: &[u8]) -> Result<Option<&mut T>, Reply> {
        match self.db.get_mut(key) {
            None => Ok(None),
            Some(e) => T::peek_mut(&mut e.object)
                .map(Some)
                .ok_or_else(|| Reply::error(WRONGTYPE)),
        }
    }

    fn write_or_create<T: Kind>(&mut self, key: &Bytes) -> Result<&mut T, Reply> {
        if !self.db.contains_key(key) {
            self.put(key, T::default().wrap(), false);
        }
        self.write::<T>(key)?
            .ok_or_else(|| Reply::error("ERR internal: key vanished"))
    }

    fn drop_if_empty(&mut self, key: &Bytes) {
        if self
            .db
            .get(key)
            .is_some_and(|e| e.object.is_empty_collection())
        {
            self.remove(key);
        }
    }

    // --- dispatch -------------------------------------------------------------

    fn dispatch(&mut self, session: &mut Session, now: i64, name: &str, a: &[Bytes]) -> Reply {
        let result = match name {
            "PING" => Ok(self.ping(session, a)),
            "ECHO" => Ok(Reply::bulk(a[1].clone())),
            "HELLO" => self.hello(session, a),
            "CLIENT" => Ok(Self::client(session, a)),
            "SELECT" => Self::select(a),
            "QUIT" => {
                session.quit = true;
                Ok(Reply::ok())
            }
            "FLUSHALL" | "FLUSHDB" => self.flushall(a),
            "DBSIZE" => Ok(Reply::Integer(self.db.len() as i64)),
            "DEL" => Ok(self.del(a)),
            "EXISTS" => Ok(Reply::Integer(
                a[1..].iter().filter(|k| self.db.contains_key(*k)).count() as i64,
            )),
            "TYPE" => Ok(Reply::Status(Bytes::from_static(
                self.db
                    .get(&a[1])
                    .map_or("none", |e| e.object.type_name())
                    .as_bytes(),
            ))),
            "KEYS" => Ok(Reply::bulks(
                self.db
                    .keys()
                    .filter(|k| glob_match(&a[1], k))
                    .cloned()
                    .collect::<Vec<_>>(),
            )),
            "GET" => self.read::<Bytes>(&a[1]).map(|v| Reply::Bulk(v.cloned())),
            "SET" => self.set(now, a),
            "SETNX" => Ok(self.setnx(a)),
            "GETDEL" => self.getdel(a),
            "INCR" => self.incr_by(&a[1], 1),
            "DECR" => self.incr_by(&a[1], -1),
            "INCRBY" => match parse_i64(&a[2]) {
                Some(n) => self.incr_by(&a[1], n),
                None => Err(Reply::error(NOT_INTEGER)),
            },
            "DECRBY" => match parse_i64(&a[2]) {
                Some(i64::MIN) => Err(Reply::error("ERR decrement would overflow")),
                Some(n) => self.incr_by(&a[1], -n),
                None => Err(Reply::error(NOT_INTEGER)),
            },
            "EXPIRE" => self.expire(now, a, 1000, "expire"),
            "PEXPIRE" => self.expire(now, a, 1, "pexpire"),
            "TTL" => Ok(self.ttl(now, &a[1], false)),
            "PTTL" => Ok(self.ttl(now, &a[1], true)),
            "PERSIST" => Ok(self.persist(&a[1])),
            "SADD" => self.sadd(a),
            "SREM" => self.srem(a),
            "SISMEMBER" => self
                .read::<BTreeSet<Bytes>>(&a[1])
                .map(|s| Reply::Integer(s.is_some_and(|s| s.contains(&a[2])) as i64)),
            "SMEMBERS" => self.read::<BTreeSet<Bytes>>(&a[1]).map(|s| {
                Reply::Set(
                    s.into_iter()
                        .flatten()
                        .map(|m| Reply::bulk(m.clone()))
                        .collect(),
                )
            }),
            "SCARD" => self
                .read::<BTreeSet<Bytes>>(&a[1])
                .map(|s| Reply::Integer(s.map_or(0, BTreeSet::len) as i64)),
            "HSET" => self.hset(name, a),
            "HSETNX" => self.hsetnx(a),
            "HINCRBY" => self.hincrby(a),
            "HGET" => self
                .read::<BTreeMap<Bytes, Bytes>>(&a[1])
                .map(|h| Reply::Bulk(h.and_then(|h| h.get(&a[2]).cloned()))),
            "HDEL" => self.hdel(a),
            "HGETALL" => self.read::<BTreeMap<Bytes, Bytes>>(&a[1]).map(|h| {
                Reply::Map(
                    h.into_iter()
                        .flatten()
                        .map(|(f, v)| (Reply::bulk(f.clone()), Reply::bulk(v.clone())))
                        .collect(),
                )
            }),
            "HLEN" => self
                .read::<BTreeMap<Bytes, Bytes>>(&a[1])
                .map(|h| Reply::Integer(h.map_or(0, BTreeMap::len) as i64)),
            "RPUSH" => self.push(a, false),
            "LPUSH" => self.push(a, true),
            "LRANGE" => self.lrange(a),
            "LLEN" => self
                .read::<VecDeque<Bytes>>(&a[1])
                .map(|l| Reply::Integer(l.map_or(0, VecDeque::len) as i64)),
            "LTRIM" => self.ltrim(a),
            "ZADD" => self.zadd(a),
            "ZRANGEBYSCORE" => self.zrange(a, true),
            "ZRANGE" => self.zrange(a, false),
            "ZREM" => self.zrem(a),
            "ZCARD" => self
                .read::<ZSet>(&a[1])
                .map(|z| Reply::Integer(z.map_or(0, ZSet::len) as i64)),
            "ZCOUNT" => self.zcount(a),
            "ZREMRANGEBYSCORE" => self.zremrangebyscore(a),
            "ZREMRANGEBYRANK" => self.zremrangebyrank(a),
            "EVAL" => self.eval(session, now, a, true),
            "EVALSHA" => self.eval(session, now, a, false),
            "SCRIPT" => self.script(a),
            "ZSCORE" => self
                .read::<ZSet>(&a[1])
                .map(|z| match z.and_then(|z| z.score(&a[2])) {
                    Some(s) => Reply::Double(s),
                    None => Reply::nil(),
                }),
            "PUBLISH" => Ok(self.publish(session, a)),
            "SUBSCRIBE" => Ok(self.subscribe(session, a)),
            "UNSUBSCRIBE" => Ok(self.unsubscribe(session, a)),
            // MULTI/EXEC/DISCARD are handled by `execute_in`; queued inside
            // a transaction they are never dispatched.
            _ => Err(unknown_command(a)),
        };
        if let Some(journal) = &mut self.journal {
            journal.push(Executed {
                client: session.id,
                args: a.to_vec(),
                failed: result.is_err(),
            });
        }
        result.unwrap_or_else(|e| e)
    }

    // --- connection commands ----------------------------------------------------

    fn ping(&self, session: &Session, a: &[Bytes]) -> Reply {
        if a.len() > 2 {
            return arity_error("ping");
        }
        if session.in_subscribed_context() {
            let msg = a.get(1).cloned().unwrap_or_default();
            return Reply::Array(Some(vec![
                Reply::bulk(Bytes::from_static(b"pong")),
                Reply::bulk(msg),
            ]));
        }
        match a.get(1) {
            Some(msg) => Reply::bulk(msg.clone()),
            None => Reply::Status(Bytes::from_static(b"PONG")),
        }
    }

    fn hello(&self, session: &mut Session, a: &[Bytes]) -> CmdResult {
        let mut resp3 = session.resp3;
        if let Some(ver) = a.get(1) {
            match parse_i64(ver) {
                None => {
                    return Err(Reply::error(
                        "ERR Protocol version is not an integer or out of range",
                    ));
                }
                Some(2) => resp3 = false,
                Some(3) => resp3 = true,
                Some(_) => return Err(Reply::error("NOPROTO unsupported protocol version")),
            }
            let mut j = 2;
            let mut name = None;
            while j < a.len() {
                let more = a.len() - 1 - j;
                if eq_ignore_case(&a[j], "AUTH") && more >= 2 {
                    j += 3;
                } else if eq_ignore_case(&a[j], "SETNAME") && more >= 1 {
                    name = Some(a[j + 1].clone());
                    j += 2;
                } else {
                    return Err(Reply::error(format!(
                        "ERR Syntax error in HELLO option '{}'",
                        lossy(&a[j])
                    )));
                }
            }
            if name.is_some() {
                session.name = name;
            }
        }
        session.resp3 = resp3;
        let s = |t: &'static str| Reply::bulk(Bytes::from_static(t.as_bytes()));
        Ok(Reply::Map(vec![
            (s("server"), s("redis")),
            (s("version"), s("7.0.15")),
            (s("proto"), Reply::Integer(if resp3 { 3 } else { 2 })),
            (s("id"), Reply::Integer(session.id.0 as i64)),
            (s("mode"), s("standalone")),
            (s("role"), s("master")),
            (s("modules"), Reply::Array(Some(Vec::new()))),
        ]))
    }

    fn client(session: &mut Session, a: &[Bytes]) -> Reply {
        if eq_ignore_case(&a[1], "ID") {
            Reply::Integer(session.id.0 as i64)
        } else if eq_ignore_case(&a[1], "GETNAME") {
            Reply::Bulk(session.name.clone())
        } else if eq_ignore_case(&a[1], "SETNAME") {
            match a.get(2) {
                Some(name) if a.len() == 3 => {
                    session.name = (!name.is_empty()).then(|| name.clone());
                    Reply::ok()
                }
                _ => arity_error("client|setname"),
            }
        } else {
            Reply::ok()
        }
    }

    fn select(a: &[Bytes]) -> CmdResult {
        match parse_i64(&a[1]) {
            None => Err(Reply::error(NOT_INTEGER)),
            Some(0) => Ok(Reply::ok()),
            Some(1..=15) => Err(Reply::error(
                "ERR the imsim Redis model only has database 0",
            )),
            Some(_) => Err(Reply::error("ERR DB index is out of range")),
        }
    }

    fn flushall(&mut self, a: &[Bytes]) -> CmdResult {
        match a.len() {
            1 => {}
            2 if eq_ignore_case(&a[1], "ASYNC") || eq_ignore_case(&a[1], "SYNC") => {}
            _ => return Err(Reply::error(SYNTAX)),
        }
        self.flush();
        Ok(Reply::ok())
    }

    // --- keys -------------------------------------------------------------

    fn del(&mut self, a: &[Bytes]) -> Reply {
        let mut n = 0;
        for key in &a[1..] {
            if self.remove(key).is_some() {
                n += 1;
            }
        }
        Reply::Integer(n)
    }

    fn expire(&mut self, now: i64, a: &[Bytes], unit_ms: i64, cmd: &str) -> CmdResult {
        let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
        for opt in &a[3..] {
            if eq_ignore_case(opt, "NX") {
                nx = true;
            } else if eq_ignore_case(opt, "XX") {
                xx = true;
            } else if eq_ignore_case(opt, "GT") {
                gt = true;
            } else if eq_ignore_case(opt, "LT") {
                lt = true;
            } else {
                return Err(Reply::error(format!(
                    "ERR Unsupported option {}",
                    lossy(opt)
                )));
            }
        }
        if nx && (xx || gt || lt) {
            return Err(Reply::error(
                "ERR NX and XX, GT or LT options at the same time are not compatible",
            ));
        }
        if gt && lt {
            return Err(Reply::error(
                "ERR GT and LT options at the same time are not compatible",
            ));
        }
        let n = parse_i64(&a[2]).ok_or_else(|| Reply::error(NOT_INTEGER))?;
        let invalid = || Reply::error(format!("ERR invalid expire time in '{cmd}' command"));
        let when = n
            .checked_mul(unit_ms)
            .and_then(|ms| ms.checked_add(now))
            .ok_or_else(invalid)?;
        let key = &a[1];
        if !self.db.contains_key(key) {
            return Ok(Reply::Integer(0));
        }
        let current = self.expiry(key);
        let refused = (nx && current.is_some())
            || (xx && current.is_none())
            || (gt && current.is_none_or(|c| when <= c))
            || (lt && current.is_some_and(|c| when >= c));
        if refused {
            return Ok(Reply::Integer(0));
        }
        if when <= now {
            self.remove(key);
        } else {
            self.set_expiry(key, Some(when));
        }
        Ok(Reply::Integer(1))
    }

    fn ttl(&self, now: i64, key: &[u8], millis: bool) -> Reply {
        if !self.db.contains_key(key) {
            return Reply::Integer(-2);
        }
        match self.expiry(key) {
            None => Reply::Integer(-1),
            Some(at) => {
                let ms = (at - now).max(0);
                Reply::Integer(if millis { ms } else { (ms + 500) / 1000 })
            }
        }
    }

    fn persist(&mut self, key: &Bytes) -> Reply {
        if self.expiry(key).is_some() {
            self.set_expiry(key, None);
            Reply::Integer(1)
        } else {
            Reply::Integer(0)
        }
    }

    // --- strings ----------------------------------------------------------------

    fn set(&mut self, now: i64, a: &[Bytes]) -> CmdResult {
        // Redis accepts an expiry option again only if it is the same one
        // (`EX 1 EX 2`: the last wins), and KEEPTTL with no other.
        const EXPIRY_OPTIONS: [&str; 5] = ["KEEPTTL", "EX", "PX", "EXAT", "PXAT"];
        let (mut nx, mut xx, mut get) = (false, false, false);
        let mut expiry: Option<&str> = None;
        let mut expiry_arg: Option<&Bytes> = None;
        let mut j = 3;
        while j < a.len() {
            let opt = &a[j];
            let next = a.get(j + 1);
            let option = EXPIRY_OPTIONS.into_iter().find(|o| eq_ignore_case(opt, o));
            if eq_ignore_case(opt, "NX") && !xx {
                nx = true;
            } else if eq_ignore_case(opt, "XX") && !nx {
                xx = true;
            } else if eq_ignore_case(opt, "GET") {
                get = true;
            } else if let Some(option) = option
                && expiry.is_none_or(|e| e == option)
                && (option == "KEEPTTL" || next.is_some())
            {
                expiry = Some(option);
                if option != "KEEPTTL" {
                    expiry_arg = next;
                    j += 1;
                }
            } else {
                return Err(Reply::error(SYNTAX));
            }
            j += 1;
        }
        let when = match (expiry, expiry_arg) {
            (Some(option), Some(n)) => {
                let n = parse_i64(n).ok_or_else(|| Reply::error(NOT_INTEGER))?;
                let invalid = || Reply::error("ERR invalid expire time in 'set' command");
                if n <= 0 {
                    return Err(invalid());
                }
                let unit_ms = if option.starts_with('E') { 1000 } else { 1 };
                let base = if option.ends_with("AT") { 0 } else { now };
                Some(
                    n.checked_mul(unit_ms)
                        .and_then(|ms| ms.checked_add(base))
                        .ok_or_else(invalid)?,
                )
            }
            _ => None,
        };
        let key = &a[1];
        let old = if get {
            Some(self.read::<Bytes>(key)?.cloned())
        } else {
            None
        };
        let found = self.db.contains_key(key);
        if (nx && found) || (xx && !found) {
            return Ok(match old {
                Some(old) => Reply::Bulk(old),
                None => Reply::nil(),
            });
        }
        self.put(key, Object::String(a[2].clone()), expiry == Some("KEEPTTL"));
        if let Some(when) = when {
            if when <= now {
                // EXAT/PXAT in the past: Redis sets, then deletes at once.
                self.remove(key);
            } else {
                self.set_expiry(key, Some(when));
            }
        }
        Ok(match old {
            Some(old) => Reply::Bulk(old),
            None => Reply::ok(),
        })
    }

    fn setnx(&mut self, a: &[Bytes]) -> Reply {
        if self.db.contains_key(&a[1]) {
            return Reply::Integer(0);
        }
        self.put(&a[1], Object::String(a[2].clone()), false);
        Reply::Integer(1)
    }

    fn getdel(&mut self, a: &[Bytes]) -> CmdResult {
        let value = self.read::<Bytes>(&a[1])?.cloned();
        if value.is_some() {
            self.remove(&a[1]);
        }
        Ok(Reply::Bulk(value))
    }

    fn incr_by(&mut self, key: &Bytes, by: i64) -> CmdResult {
        let current = match self.read::<Bytes>(key)? {
            None => 0,
            Some(v) => parse_i64(v).ok_or_else(|| Reply::error(NOT_INTEGER))?,
        };
        let next = current
            .checked_add(by)
            .ok_or_else(|| Reply::error("ERR increment or decrement would overflow"))?;
        self.put(key, Object::String(Bytes::from(next.to_string())), true);
        Ok(Reply::Integer(next))
    }

    // --- sets ---------------------------------------------------------------------

    fn sadd(&mut self, a: &[Bytes]) -> CmdResult {
        let set = self.write_or_create::<BTreeSet<Bytes>>(&a[1])?;
        let added = a[2..].iter().filter(|m| set.insert((*m).clone())).count();
        Ok(Reply::Integer(added as i64))
    }

    fn srem(&mut self, a: &[Bytes]) -> CmdResult {
        let Some(set) = self.write::<BTreeSet<Bytes>>(&a[1])? else {
            return Ok(Reply::Integer(0));
        };
        let removed = a[2..].iter().filter(|m| set.remove(*m)).count();
        self.drop_if_empty(&a[1]);
        Ok(Reply::Integer(removed as i64))
    }

    // --- hashes -------------------------------------------------------------------

    fn hset(&mut self, name: &str, a: &[Bytes]) -> CmdResult {
        if a.len() % 2 == 1 {
            return Err(arity_error(name));
        }
        let hash = self.write_or_create::<BTreeMap<Bytes, Bytes>>(&a[1])?;
        let mut added = 0;
        for pair in a[2..].chunks_exact(2) {
            if hash.insert(pair[0].clone(), pair[1].clone()).is_none() {
                added += 1;
            }
        }
        Ok(Reply::Integer(added))
    }

    fn hsetnx(&mut self, a: &[Bytes]) -> CmdResult {
        let hash = self.write_or_create::<BTreeMap<Bytes, Bytes>>(&a[1])?;
        if hash.contains_key(&a[2]) {
            return Ok(Reply::Integer(0));
        }
        hash.insert(a[2].clone(), a[3].clone());
        Ok(Reply::Integer(1))
    }

    fn hincrby(&mut self, a: &[Bytes]) -> CmdResult {
        // Redis parses the increment before it looks at the key, so a bad
        // increment on a key of another type is not WRONGTYPE.
        let by = parse_i64(&a[3]).ok_or_else(|| Reply::error(NOT_INTEGER))?;
        let current = match self.read::<BTreeMap<Bytes, Bytes>>(&a[1])? {
            None => None,
            Some(hash) => hash.get(&a[2]).cloned(),
        };
        let current = match current {
            None => 0,
            Some(v) => {
                parse_i64(&v).ok_or_else(|| Reply::error("ERR hash value is not an integer"))?
            }
        };
        let next = current
            .checked_add(by)
            .ok_or_else(|| Reply::error("ERR increment or decrement would overflow"))?;
        let hash = self.write_or_create::<BTreeMap<Bytes, Bytes>>(&a[1])?;
        hash.insert(a[2].clone(), Bytes::from(next.to_string()));
        Ok(Reply::Integer(next))
    }

    fn hdel(&mut self, a: &[Bytes]) -> CmdResult {
        let Some(hash) = self.write::<BTreeMap<Bytes, Bytes>>(&a[1])? else {
            return Ok(Reply::Integer(0));
        };
        let removed = a[2..].iter().filter(|f| hash.remove(*f).is_some()).count();
        self.drop_if_empty(&a[1]);
        Ok(Reply::Integer(removed as i64))
    }

    // --- lists ----------------------------------------------------------------------

    fn push(&mut self, a: &[Bytes], head: bool) -> CmdResult {
        let list = self.write_or_create::<VecDeque<Bytes>>(&a[1])?;
        for v in &a[2..] {
            if head {
                list.push_front(v.clone());
            } else {
                list.push_back(v.clone());
            }
        }
        Ok(Reply::Integer(list.len() as i64))
    }

    fn lrange(&self, a: &[Bytes]) -> CmdResult {
        let (start, stop) = match (parse_i64(&a[2]), parse_i64(&a[3])) {
            (Some(s), Some(e)) => (s, e),
            _ => return Err(Reply::error(NOT_INTEGER)),
        };
        let Some(list) = self.read::<VecDeque<Bytes>>(&a[1])? else {
            return Ok(Reply::Array(Some(Vec::new())));
        };
        Ok(match index_range(start, stop, list.len()) {
            None => Reply::Array(Some(Vec::new())),
            Some((s, e)) => Reply::bulks(list.range(s..=e).cloned()),
        })
    }

    fn ltrim(&mut self, a: &[Bytes]) -> CmdResult {
        let (start, stop) = match (parse_i64(&a[2]), parse_i64(&a[3])) {
            (Some(s), Some(e)) => (s, e),
            _ => return Err(Reply::error(NOT_INTEGER)),
        };
        let Some(list) = self.write::<VecDeque<Bytes>>(&a[1])? else {
            return Ok(Reply::ok());
        };
        match index_range(start, stop, list.len()) {
            None => list.clear(),
            Some((s, e)) => {
                list.truncate(e + 1);
                list.drain(..s);
            }
        }
        self.drop_if_empty(&a[1]);
        Ok(Reply::ok())
    }

    // --- sorted sets ------------------------------------------------------------------

    fn zadd(&mut self, a: &[Bytes]) -> CmdResult {
        let (mut nx, mut xx, mut gt, mut lt, mut ch, mut incr) =
            (false, false, false, false, false, false);
        let mut i = 2;
        while i < a.len() {
            let o = &a[i];
            if eq_ignore_case(o, "NX") {
                nx = true;
            } else if eq_ignore_case(o, "XX") {
                xx = true;
            } else if eq_ignore_case(o, "GT") {
                gt = true;
            } else if eq_ignore_case(o, "LT") {
                lt = true;
            } else if eq_ignore_case(o, "CH") {
                ch = true;
            } else if eq_ignore_case(o, "INCR") {
                incr = true;
            } else {
                break;
            }
            i += 1;
        }
        let rest = &a[i..];
        if rest.is_empty() || rest.len() % 2 == 1 {
            return Err(Reply::error(SYNTAX));
        }
        if nx && xx {
            return Err(Reply::error(
                "ERR XX and NX options at the same time are not compatible",
            ));
        }
        if (nx && (gt || lt)) || (gt && lt) {
            return Err(Reply::error(
                "ERR GT, LT, and/or NX options at the same time are not compatible",
            ));
        }
        if incr && rest.len() > 2 {
            return Err(Reply::error(
                "ERR INCR option supports a single increment-element pair",
            ));
        }
        let mut pairs = Vec::with_capacity(rest.len() / 2);
        for pair in rest.chunks_exact(2) {
            let score = parse_f64(&pair[0]).ok_or_else(|| Reply::error(NOT_FLOAT))?;
            pairs.push((score, pair[1].clone()));
        }
        let key = &a[1];
        let exists = self.read::<ZSet>(key)?.is_some();
        let (mut added, mut updated, mut processed) = (0, 0, 0);
        let mut last_score = 0.0;
        if exists || !xx {
            let z = self.write_or_create::<ZSet>(key)?;
            for (score, member) in pairs {
                match z.score(&member) {
                    Some(current) => {
                        if nx {
                            continue;
                        }
                        let new = if incr { current + score } else { score };
                        if new.is_nan() {
                            return Err(Reply::error("ERR resulting score is not a number (NaN)"));
                        }
                        if (gt && new <= current) || (lt && new >= current) {
                            continue;
                        }
                        processed += 1;
                        last_score = new;
                        if new != current {
                            z.insert(member, new);
                            updated += 1;
                        }
                    }
                    None => {
                        if xx {
                            continue;
                        }
                        z.insert(member, score);
                        added += 1;
                        processed += 1;
                        // The reply shows the score as given (-0 stays -0)
                        // although the set stores 0.
                        last_score = score;
                    }
                }
            }
        }
        self.drop_if_empty(key);
        Ok(if incr {
            if processed > 0 {
                Reply::Double(last_score)
            } else {
                Reply::nil()
            }
        } else {
            Reply::Integer(if ch { added + updated } else { added })
        })
    }

    /// ZRANGEBYSCORE (`by_score_cmd`) and ZRANGE.
    fn zrange(&self, a: &[Bytes], by_score_cmd: bool) -> CmdResult {
        let (mut by_score, mut rev, mut withscores) = (by_score_cmd, false, false);
        let mut by_lex = false;
        let mut limit: Option<(i64, i64)> = None;
        let mut j = 4;
        while j < a.len() {
            let o = &a[j];
            let left = a.len() - j - 1;
            if eq_ignore_case(o, "WITHSCORES") {
                withscores = true;
            } else if eq_ignore_case(o, "LIMIT") && left >= 2 {
                match (parse_i64(&a[j + 1]), parse_i64(&a[j + 2])) {
                    (Some(off), Some(count)) => limit = Some((off, count)),
                    _ => return Err(Reply::error(NOT_INTEGER)),
                }
                j += 2;
            } else if !by_score_cmd && eq_ignore_case(o, "BYSCORE") {
                by_score = true;
            } else if !by_score_cmd && eq_ignore_case(o, "BYLEX") {
                by_lex = true;
            } else if !by_score_cmd && eq_ignore_case(o, "REV") {
                rev = true;
            } else {
                return Err(Reply::error(SYNTAX));
            }
            j += 1;
        }
        if by_lex {
            return Err(Reply::error(
                "ERR the imsim Redis model does not support ZRANGE BYLEX",
            ));
        }
        if limit.is_some() && !by_score {
            return Err(Reply::error(
                "ERR syntax error, LIMIT is only supported in combination with either BYSCORE or BYLEX",
            ));
        }
        let emit = |items: Vec<(&Bytes, f64)>| -> Reply {
            if withscores {
                Reply::Pairs(
                    items
                        .into_iter()
                        .map(|(m, s)| (Reply::bulk(m.clone()), Reply::Double(s)))
                        .collect(),
                )
            } else {
                Reply::bulks(items.into_iter().map(|(m, _)| m.clone()))
            }
        };
        if by_score {
            // With REV the arguments are max then min.
            let (lo, hi) = if rev { (&a[3], &a[2]) } else { (&a[2], &a[3]) };
            let range = ScoreRange::parse(lo, hi).ok_or_else(|| Reply::error(RANGE_NOT_FLOAT))?;
            let Some(z) = self.read::<ZSet>(&a[1])? else {
                return Ok(emit(Vec::new()));
            };
            let matching: Box<dyn Iterator<Item = (&Bytes, f64)>> = if rev {
                Box::new(z.iter().rev().filter(|(_, s)| range.contains(*s)))
            } else {
                Box::new(z.iter().filter(|(_, s)| range.contains(*s)))
            };
            let items: Vec<_> = match limit {
                None => matching.collect(),
                Some((off, _)) if off < 0 => Vec::new(),
                Some((off, count)) => {
                    let skipped = matching.skip(off as usize);
                    if count < 0 {
                        skipped.collect()
                    } else {
                        skipped.take(count as usize).collect()
                    }
                }
            };
            return Ok(emit(items));
        }
        let (start, stop) = match (parse_i64(&a[2]), parse_i64(&a[3])) {
            (Some(s), Some(e)) => (s, e),
            _ => return Err(Reply::error(NOT_INTEGER)),
        };
        let Some(z) = self.read::<ZSet>(&a[1])? else {
            return Ok(emit(Vec::new()));
        };
        let Some((s, e)) = index_range(start, stop, z.len()) else {
            return Ok(emit(Vec::new()));
        };
        let items: Vec<_> = if rev {
            z.iter().rev().skip(s).take(e - s + 1).collect()
        } else {
            z.iter().skip(s).take(e - s + 1).collect()
        };
        Ok(emit(items))
    }

    fn zcount(&self, a: &[Bytes]) -> CmdResult {
        // Like ZRANGEBYSCORE: the range is checked before the key's type.
        let range = ScoreRange::parse(&a[2], &a[3]).ok_or_else(|| Reply::error(RANGE_NOT_FLOAT))?;
        let Some(z) = self.read::<ZSet>(&a[1])? else {
            return Ok(Reply::Integer(0));
        };
        let count = z.iter().filter(|(_, s)| range.contains(*s)).count();
        Ok(Reply::Integer(count as i64))
    }

    fn zrem(&mut self, a: &[Bytes]) -> CmdResult {
        let Some(z) = self.write::<ZSet>(&a[1])? else {
            return Ok(Reply::Integer(0));
        };
        let removed = a[2..].iter().filter(|m| z.remove(m)).count();
        self.drop_if_empty(&a[1]);
        Ok(Reply::Integer(removed as i64))
    }

    fn zremrangebyrank(&mut self, a: &[Bytes]) -> CmdResult {
        let (start, stop) = match (parse_i64(&a[2]), parse_i64(&a[3])) {
            (Some(s), Some(e)) => (s, e),
            _ => return Err(Reply::error(NOT_INTEGER)),
        };
        let Some(z) = self.write::<ZSet>(&a[1])? else {
            return Ok(Reply::Integer(0));
        };
        let Some((s, e)) = index_range(start, stop, z.len()) else {
            return Ok(Reply::Integer(0));
        };
        let doomed: Vec<Bytes> = z
            .iter()
            .skip(s)
            .take(e - s + 1)
            .map(|(m, _)| m.clone())
            .collect();
        Ok(self.zrem_members(&a[1], doomed))
    }

    /// Removes `doomed` from the sorted set at `key` (dropping the key if
    /// it empties); answers how many.
    fn zrem_members(&mut self, key: &Bytes, doomed: Vec<Bytes>) -> Reply {
        if let Ok(Some(z)) = self.write::<ZSet>(key) {
            for m in &doomed {
                z.remove(m);
            }
        }
        self.drop_if_empty(key);
        Reply::Integer(doomed.len() as i64)
    }

    fn zremrangebyscore(&mut self, a: &[Bytes]) -> CmdResult {
        let range = ScoreRange::parse(&a[2], &a[3]).ok_or_else(|| Reply::error(RANGE_NOT_FLOAT))?;
        let Some(z) = self.write::<ZSet>(&a[1])? else {
            return Ok(Reply::Integer(0));
        };
        let doomed: Vec<Bytes> = z
            .iter()
            .filter(|(_, s)| range.contains(*s))
            .map(|(m, _)| m.clone())
            .collect();
        Ok(self.zrem_members(&a[1], doomed))
    }

    // --- scripting -------------------------------------------------------------------

    /// EVAL and EVALSHA: only the scripts in [`redis_scripts::KNOWN`] run
    /// (natively); see that module.
    fn eval(&mut self, session: &mut Session, now: i64, a: &[Bytes], by_source: bool) -> CmdResult {
        let numkeys = parse_i64(&a[2]).ok_or_else(|| Reply::error(NOT_INTEGER))?;
        if numkeys < 0 {
            return Err(Reply::error("ERR Number of keys can't be negative"));
        }
        if numkeys as usize > a.len() - 3 {
            return Err(Reply::error(
                "ERR Number of keys can't be greater than number of args",
            ));
        }
        let sha = if by_source {
            let sha = redis_scripts::sha1_hex(&lossy(&a[1]));
            if redis_scripts::native(&sha).is_none() {
                return Err(Reply::error(UNKNOWN_SCRIPT));
            }
            self.script_cache.insert(sha.clone());
            sha
        } else {
            let sha = lossy(&a[1]).to_ascii_lowercase();
            if !self.script_cache.contains(&sha) {
                return Err(Reply::error(
                    "NOSCRIPT No matching script. Please use EVAL.",
                ));
            }
            sha
        };
        let native = redis_scripts::native(&sha).ok_or_else(|| Reply::error(UNKNOWN_SCRIPT))?;
        let (keys, argv) = a[3..].split_at(numkeys as usize);
        let mut call = ScriptContext {
            store: self,
            session,
            now,
        };
        native(&mut call, keys, argv)
    }

    fn script(&mut self, a: &[Bytes]) -> CmdResult {
        let sub = lossy(&a[1]).to_ascii_uppercase();
        match (sub.as_str(), a.len()) {
            ("LOAD", 3) => {
                let sha = redis_scripts::sha1_hex(&lossy(&a[2]));
                if redis_scripts::native(&sha).is_none() {
                    return Err(Reply::error(UNKNOWN_SCRIPT));
                }
                self.script_cache.insert(sha.clone());
                Ok(Reply::bulk(sha))
            }
            ("EXISTS", n) if n >= 3 => Ok(Reply::Array(Some(
                a[2..]
                    .iter()
                    .map(|sha| {
                        let sha = lossy(sha).to_ascii_lowercase();
                        Reply::Integer(self.script_cache.contains(&sha) as i64)
                    })
                    .collect(),
            ))),
            ("FLUSH", 2) => {
                self.script_cache.clear();
                Ok(Reply::ok())
            }
            ("FLUSH", 3) if eq_ignore_case(&a[2], "SYNC") || eq_ignore_case(&a[2], "ASYNC") => {
                self.script_cache.clear();
                Ok(Reply::ok())
            }
            ("FLUSH", 3) => Err(Reply::error(
                "ERR SCRIPT FLUSH only support SYNC|ASYNC option",
            )),
            ("LOAD" | "EXISTS" | "FLUSH", _) => Err(Reply::error(format!(
                "ERR unknown subcommand or wrong number of arguments for '{}'. Try SCRIPT HELP.",
                lossy(&a[1])
            ))),
            _ => Err(Reply::error(format!(
                "ERR unknown subcommand '{}'. Try SCRIPT HELP.",
                lossy(&a[1])
            ))),
        }
    }

    // --- pub/sub ----------------------------------------------------------------------

    fn publish(&mut self, session: &Session, a: &[Bytes]) -> Reply {
        let (channel, payload) = (&a[1], &a[2]);
        let Some(subscribers) = self.channels.get(channel) else {
            return Reply::Integer(0);
        };
        let mut own = None;
        for client in subscribers {
            if *client == session.id {
                // Redis writes a publisher's own message into its output
                // buffer at once: before this reply (checked byte for byte
                // by the differential pub/sub test).
                own = Some(Reply::Push(vec![
                    Reply::bulk(Bytes::from_static(b"message")),
                    Reply::bulk(channel.clone()),
                    Reply::bulk(payload.clone()),
                ]));
                continue;
            }
            self.deliveries.push(Delivery {
                client: *client,
                channel: channel.clone(),
                payload: payload.clone(),
            });
        }
        let count = Reply::Integer(subscribers.len() as i64);
        match own {
            Some(push) => Reply::AfterPushes(vec![push], Box::new(count)),
            None => count,
        }
    }

    fn confirmation(kind: &'static [u8], channel: Option<Bytes>, count: usize) -> Reply {
        Reply::Push(vec![
            Reply::bulk(Bytes::from_static(kind)),
            Reply::Bulk(channel),
            Reply::Integer(count as i64),
        ])
    }

    fn subscribe(&mut self, session: &mut Session, a: &[Bytes]) -> Reply {
        let mut frames = Vec::with_capacity(a.len() - 1);
        for channel in &a[1..] {
            if session.subscriptions.insert(channel.clone()) {
                self.channels
                    .entry(channel.clone())
                    .or_default()
                    .insert(session.id);
            }
            frames.push(Self::confirmation(
                b"subscribe",
                Some(channel.clone()),
                session.subscriptions.len(),
            ));
        }
        Reply::Frames(frames)
    }

    fn unsubscribe(&mut self, session: &mut Session, a: &[Bytes]) -> Reply {
        let channels: Vec<Bytes> = if a.len() > 1 {
            a[1..].to_vec()
        } else {
            session.subscriptions.iter().cloned().collect()
        };
        if channels.is_empty() {
            return Reply::Frames(vec![Self::confirmation(b"unsubscribe", None, 0)]);
        }
        let mut frames = Vec::with_capacity(channels.len());
        for channel in channels {
            if session.subscriptions.remove(&channel)
                && let Some(subscribers) = self.channels.get_mut(&channel)
            {
                subscribers.remove(&session.id);
                if subscribers.is_empty() {
                    self.channels.remove(&channel);
                }
            }
            frames.push(Self::confirmation(
                b"unsubscribe",
                Some(channel),
                session.subscriptions.len(),
            ));
        }
        Reply::Frames(frames)
    }
}

// ---------------------------------------------------------------------------
// The shared handle
// ---------------------------------------------------------------------------

/// Bounds on everything the model buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The largest request a connection buffers before it answers a
    /// protocol error and closes (Redis: 512 MiB). Default 16 MiB.
    pub request_bytes_max: usize,
    /// Pushes queued per subscriber before it is disconnected. Default 1024.
    pub push_queue_len_max: usize,
    /// Commands kept in the command log; later ones are counted as dropped.
    /// Default 100 000; 0 disables recording.
    pub command_log_len_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_bytes_max: 16 * 1024 * 1024,
            push_queue_len_max: 1024,
            command_log_len_max: 100_000,
        }
    }
}

/// One command as the model executed it, in execution order. Commands
/// queued by MULTI appear when EXEC runs them (with EXEC's time) and not at
/// all if discarded; MULTI/EXEC/DISCARD themselves and commands rejected
/// before execution (unknown, wrong arity) are not logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedCommand {
    /// Simulated time of execution.
    pub at: Duration,
    /// The connection that sent it (0: [`SharedRedis::execute`]).
    pub client: ClientId,
    /// The command and its arguments.
    pub args: Vec<Bytes>,
    /// Whether it answered an error (WRONGTYPE, syntax...), so changed
    /// nothing.
    pub failed: bool,
}

/// Counters of the command log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommandLogStats {
    /// Commands executed in total.
    pub executed: u64,
    /// Commands kept in the log.
    pub recorded: u64,
    /// Commands not kept because the log was full.
    pub dropped: u64,
}

/// The clock the model reads: simulated time since the start.
pub type Clock = Arc<dyn Fn() -> Duration + Send + Sync>;

/// A message queued for one subscriber.
#[derive(Debug)]
struct PushMessage {
    channel: Bytes,
    payload: Bytes,
}

/// What a connection needs to be told from outside: its push queue, and a
/// kill switch (queue overflow, [`SharedRedis::kill_all_clients`]).
#[derive(Debug)]
struct ClientHandle {
    tx: mpsc::Sender<PushMessage>,
    kill: Arc<Kill>,
}

#[derive(Debug, Default)]
struct Kill {
    killed: AtomicBool,
    notify: Notify,
}

impl Kill {
    fn trigger(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }

    async fn wait(&self) {
        if self.killed.load(Ordering::SeqCst) {
            return;
        }
        self.notify.notified().await;
    }
}

struct Inner {
    store: Store,
    delay: Duration,
    limits: Limits,
    next_client: u64,
    clients: BTreeMap<ClientId, ClientHandle>,
    log: Vec<LoggedCommand>,
    stats: CommandLogStats,
    push_overflows: u64,
}

impl Inner {
    fn run(&mut self, session: &mut Session, now: Duration, args: &[Bytes]) -> Reply {
        let reply = self.store.execute_in(session, now, args);
        self.record(now);
        self.deliver();
        reply
    }

    /// Moves the store's journal into the bounded command log.
    fn record(&mut self, now: Duration) {
        let executed = self
            .store
            .journal
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        for e in executed {
            self.stats.executed += 1;
            if self.log.len() < self.limits.command_log_len_max {
                self.log.push(LoggedCommand {
                    at: now,
                    client: e.client,
                    args: e.args,
                    failed: e.failed,
                });
                self.stats.recorded += 1;
            } else {
                self.stats.dropped += 1;
            }
        }
    }

    /// Moves PUBLISH output into the subscribers' bounded queues; a full
    /// queue disconnects its subscriber.
    fn deliver(&mut self) {
        for d in self.store.take_deliveries() {
            let Some(client) = self.clients.get(&d.client) else {
                continue;
            };
            let msg = PushMessage {
                channel: d.channel,
                payload: d.payload,
            };
            match client.tx.try_send(msg) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::debug!(client = %d.client, "redis model: push queue full, disconnecting subscriber");
                    self.push_overflows += 1;
                    client.kill.trigger();
                    self.clients.remove(&d.client);
                    self.store.disconnect(d.client);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.clients.remove(&d.client);
                    self.store.disconnect(d.client);
                }
            }
        }
    }
}

/// The cloneable handle to one simulated Redis: the store, its clock and the
/// knobs the simulation turns.
#[derive(Clone)]
pub struct SharedRedis {
    inner: Arc<Mutex<Inner>>,
    clock: Clock,
}

impl fmt::Debug for SharedRedis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedRedis").finish_non_exhaustive()
    }
}

impl SharedRedis {
    /// A Redis with default [`Limits`] reading simulated time from `clock`
    /// (in the simulation: `turmoil::sim_elapsed().unwrap_or_default()`).
    pub fn new(clock: impl Fn() -> Duration + Send + Sync + 'static) -> SharedRedis {
        SharedRedis::with_limits(clock, Limits::default())
    }

    /// A Redis with explicit limits.
    pub fn with_limits(
        clock: impl Fn() -> Duration + Send + Sync + 'static,
        limits: Limits,
    ) -> SharedRedis {
        SharedRedis {
            inner: Arc::new(Mutex::new(Inner {
                store: Store {
                    journal: Some(Vec::new()),
                    ..Store::new()
                },
                delay: Duration::ZERO,
                limits,
                next_client: 1,
                clients: BTreeMap::new(),
                log: Vec::new(),
                stats: CommandLogStats::default(),
                push_overflows: 0,
            })),
            clock: Arc::new(clock),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere must not hide the state from the checkers.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current simulated time, from the injected clock.
    pub fn now(&self) -> Duration {
        (self.clock)()
    }

    /// Delays the reply to every command by `delay` (a slow Redis).
    pub fn set_delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    /// The current reply delay.
    pub fn delay(&self) -> Duration {
        self.lock().delay
    }

    /// The limits this Redis runs with.
    pub fn limits(&self) -> Limits {
        self.lock().limits
    }

    /// Loses every key (a restart without persistence). Connections and
    /// their subscriptions are not touched: crash or bounce the host for
    /// that, or call [`SharedRedis::kill_all_clients`].
    pub fn flush_data(&self) {
        self.lock().store.flush();
    }

    /// Empties the script cache, as a restart of the Redis process does
    /// (with or without its data).
    pub fn lose_script_cache(&self) {
        self.lock().store.script_cache.clear();
    }

    /// Disconnects every client (like `CLIENT KILL` for all).
    pub fn kill_all_clients(&self) {
        let mut inner = self.lock();
        let clients = std::mem::take(&mut inner.clients);
        for (id, client) in clients {
            client.kill.trigger();
            inner.store.disconnect(id);
        }
    }

    /// The number of open client connections.
    pub fn connected_clients(&self) -> usize {
        self.lock().clients.len()
    }

    /// Subscribers disconnected because their push queue was full.
    pub fn push_overflows(&self) -> u64 {
        self.lock().push_overflows
    }

    /// Runs one command outside any connection (the store's detached
    /// client), at the clock's time; it is logged like any other.
    pub fn execute(&self, args: &[Bytes]) -> Reply {
        let now = self.now();
        let mut inner = self.lock();
        let mut session = std::mem::replace(&mut inner.store.detached, Session::new(ClientId(0)));
        let reply = inner.run(&mut session, now, args);
        inner.store.detached = session;
        reply
    }

    /// Direct access to the store, for checks the accessors don't cover.
    pub fn with_store<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        f(&mut self.lock().store)
    }

    /// The live keys, sorted.
    pub fn keys(&self) -> Vec<Bytes> {
        let now = self.now();
        self.lock().store.keys(now)
    }

    /// `key`'s string value, if it is a live string.
    pub fn get(&self, key: &[u8]) -> Option<Bytes> {
        let now = self.now();
        match self.lock().store.value(now, key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    /// `key`'s members, sorted; empty when absent or not a set.
    pub fn smembers(&self, key: &[u8]) -> Vec<Bytes> {
        let now = self.now();
        match self.lock().store.value(now, key) {
            Some(Value::Set(s)) => s.into_iter().collect(),
            _ => Vec::new(),
        }
    }

    /// Every channel with at least one subscriber, sorted.
    pub fn subscribed_channels(&self) -> Vec<Bytes> {
        self.lock().store.subscribed_channels()
    }

    /// A copy of every live key.
    pub fn snapshot(&self) -> BTreeMap<Bytes, KeySnapshot> {
        let now = self.now();
        self.lock().store.snapshot(now)
    }

    /// A copy of the command log (bounded by
    /// [`Limits::command_log_len_max`]).
    pub fn command_log(&self) -> Vec<LoggedCommand> {
        self.lock().log.clone()
    }

    /// The command log's counters.
    pub fn command_log_stats(&self) -> CommandLogStats {
        self.lock().stats
    }

    fn register_client(&self) -> (ClientId, mpsc::Receiver<PushMessage>, Arc<Kill>) {
        let mut inner = self.lock();
        let id = ClientId(inner.next_client);
        inner.next_client += 1;
        let (tx, rx) = mpsc::channel(inner.limits.push_queue_len_max.max(1));
        let kill = Arc::new(Kill::default());
        inner.clients.insert(
            id,
            ClientHandle {
                tx,
                kill: kill.clone(),
            },
        );
        (id, rx, kill)
    }

    fn run(&self, session: &mut Session, args: &[Bytes]) -> Reply {
        let now = self.now();
        self.lock().run(session, now, args)
    }
}

/// Unregisters a connection on every exit path.
struct ConnectionGuard {
    shared: SharedRedis,
    id: ClientId,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        inner.clients.remove(&self.id);
        inner.store.disconnect(self.id);
        tracing::debug!(client = %self.id, "redis model: client gone");
    }
}

// ---------------------------------------------------------------------------
// The connection layer
// ---------------------------------------------------------------------------

/// A request frame as a command: an array of bulk strings.
fn frame_to_args(frame: Resp2Frame) -> Result<Vec<Bytes>, String> {
    match frame {
        Resp2Frame::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Resp2Frame::BulkString(b) => Ok(b),
                other => Err(format!("expected '$', got {:?}", other.kind())),
            })
            .collect(),
        other => Err(format!("expected '*', got {:?}", other.kind())),
    }
}

fn encode_push(msg: &PushMessage, resp3: bool, out: &mut BytesMut) {
    Reply::Push(vec![
        Reply::bulk(Bytes::from_static(b"message")),
        Reply::bulk(msg.channel.clone()),
        Reply::bulk(msg.payload.clone()),
    ])
    .encode(resp3, out);
}

/// Serves one client on `stream` until it disconnects, sends QUIT, breaks
/// the protocol, overflows its push queue or is killed.
pub async fn serve_connection<S>(mut stream: S, shared: SharedRedis)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (id, mut pushes, kill) = shared.register_client();
    let _guard = ConnectionGuard {
        shared: shared.clone(),
        id,
    };
    tracing::debug!(client = %id, "redis model: client connected");
    let request_bytes_max = shared.limits().request_bytes_max;
    let mut session = Session::new(id);
    let mut input = BytesMut::with_capacity(4096);
    let mut out = BytesMut::new();
    loop {
        let mut batch = Vec::new();
        let mut protocol_error = None;
        loop {
            match redis_protocol::resp2::decode::decode_bytes_mut(&mut input) {
                Ok(Some((frame, _, _))) => match frame_to_args(frame) {
                    Ok(args) if args.is_empty() => {}
                    Ok(args) => batch.push(args),
                    Err(e) => {
                        protocol_error = Some(e);
                        break;
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    protocol_error = Some(e.to_string());
                    break;
                }
            }
        }
        if protocol_error.is_none() && input.len() > request_bytes_max {
            protocol_error = Some(format!("request larger than {request_bytes_max} bytes"));
        }
        if !batch.is_empty() {
            let delay = shared.delay();
            if !delay.is_zero() {
                tokio::select! {
                    biased;
                    () = kill.wait() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
            for args in &batch {
                let reply = shared.run(&mut session, args);
                reply.encode(session.is_resp3(), &mut out);
                if session.wants_close() {
                    break;
                }
            }
        }
        if let Some(e) = &protocol_error {
            Reply::error(format!("ERR Protocol error: {e}")).encode(session.is_resp3(), &mut out);
        }
        if !out.is_empty() {
            tokio::select! {
                biased;
                () = kill.wait() => return,
                r = stream.write_all(&out) => if r.is_err() { return },
            }
            out.clear();
        }
        if protocol_error.is_some() || session.wants_close() {
            let _ = stream.shutdown().await;
            return;
        }
        tokio::select! {
            biased;
            () = kill.wait() => return,
            msg = pushes.recv() => {
                let Some(msg) = msg else { return };
                encode_push(&msg, session.is_resp3(), &mut out);
                while let Ok(msg) = pushes.try_recv() {
                    encode_push(&msg, session.is_resp3(), &mut out);
                }
            }
            n = stream.read_buf(&mut input) => match n {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
        }
    }
}

/// Accepts clients on turmoil's `0.0.0.0:port` forever, one task each. Run
/// it as a turmoil host's software.
/// Streams are numbered by `yard`, so a crash of this host drops them in
/// a deterministic order (see [`crate::crash`]).
pub async fn serve_turmoil(
    shared: SharedRedis,
    port: u16,
    yard: crate::crash::Graveyard,
) -> turmoil::Result {
    // First, so dropped last in a crash.
    let _guard = yard.guard();
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", port)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(serve_connection(yard.wrap(stream), shared.clone()));
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(s: &str) -> Vec<Bytes> {
        s.split(' ')
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect()
    }

    fn run(store: &mut Store, now_ms: u64, s: &str) -> Reply {
        store.execute(Duration::from_millis(now_ms), &cmd(s))
    }

    fn bulk(s: &str) -> Reply {
        Reply::bulk(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn err_code(r: &Reply) -> &str {
        match r {
            Reply::Error(e) => e.split(' ').next().unwrap_or(""),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn set_px_expires_lazily_and_ttl_reports_gone() {
        let mut s = Store::new();
        assert_eq!(run(&mut s, 0, "SET k v PX 100"), Reply::ok());
        assert_eq!(run(&mut s, 50, "PTTL k"), Reply::Integer(50));
        assert_eq!(
            run(&mut s, 100, "GET k"),
            bulk("v"),
            "alive at its deadline"
        );
        assert_eq!(run(&mut s, 101, "GET k"), Reply::nil());
        assert_eq!(run(&mut s, 101, "TTL k"), Reply::Integer(-2));
        assert_eq!(run(&mut s, 101, "EXISTS k"), Reply::Integer(0));
    }

    #[test]
    fn expired_keys_leave_dbsize_and_keys() {
        let mut s = Store::new();
        run(&mut s, 0, "SET a 1 EX 1");
        run(&mut s, 0, "SADD b m");
        run(&mut s, 0, "PEXPIRE b 2000");
        run(&mut s, 0, "SET c 1");
        assert_eq!(run(&mut s, 500, "DBSIZE"), Reply::Integer(3));
        assert_eq!(run(&mut s, 1500, "DBSIZE"), Reply::Integer(2));
        assert_eq!(
            run(&mut s, 2500, "KEYS *"),
            Reply::Array(Some(vec![bulk("c")]))
        );
        assert_eq!(s.keys(Duration::from_millis(2500)), vec![Bytes::from("c")]);
    }

    #[test]
    fn ttl_rounds_and_persist_and_set_clears_ttl() {
        let mut s = Store::new();
        run(&mut s, 0, "SET k v EX 10");
        assert_eq!(run(&mut s, 400, "TTL k"), Reply::Integer(10)); // 9.6 s rounds up
        assert_eq!(run(&mut s, 600, "TTL k"), Reply::Integer(9));
        assert_eq!(run(&mut s, 600, "PERSIST k"), Reply::Integer(1));
        assert_eq!(run(&mut s, 600, "TTL k"), Reply::Integer(-1));
        run(&mut s, 600, "EXPIRE k 10");
        run(&mut s, 600, "SET k w KEEPTTL");
        assert_eq!(run(&mut s, 600, "PTTL k"), Reply::Integer(10_000));
        run(&mut s, 600, "SET k x");
        assert_eq!(run(&mut s, 600, "TTL k"), Reply::Integer(-1));
        assert_eq!(run(&mut s, 600, "EXPIRE k 0"), Reply::Integer(1));
        assert_eq!(run(&mut s, 600, "GET k"), Reply::nil());
    }

    #[test]
    fn expire_options() {
        let mut s = Store::new();
        run(&mut s, 0, "SET k v");
        assert_eq!(run(&mut s, 0, "EXPIRE k 100 XX"), Reply::Integer(0));
        assert_eq!(run(&mut s, 0, "EXPIRE k 100 GT"), Reply::Integer(0));
        assert_eq!(run(&mut s, 0, "EXPIRE k 100 NX"), Reply::Integer(1));
        assert_eq!(run(&mut s, 0, "EXPIRE k 50 GT"), Reply::Integer(0));
        assert_eq!(run(&mut s, 0, "EXPIRE k 50 LT"), Reply::Integer(1));
        assert_eq!(run(&mut s, 0, "TTL k"), Reply::Integer(50));
        assert_eq!(err_code(&run(&mut s, 0, "EXPIRE k 5 NX XX")), "ERR");
        assert_eq!(err_code(&run(&mut s, 0, "EXPIRE k x")), "ERR");
    }

    #[test]
    fn wrongtype_errors_leave_data_alone() {
        let mut s = Store::new();
        run(&mut s, 0, "SET k v");
        for c in [
            "SADD k m",
            "HSET k f v",
            "LPUSH k x",
            "ZADD k 1 m",
            "SMEMBERS k",
            "LRANGE k 0 -1",
        ] {
            assert_eq!(err_code(&run(&mut s, 0, c)), "WRONGTYPE", "{c}");
        }
        run(&mut s, 0, "SADD s m");
        assert_eq!(err_code(&run(&mut s, 0, "GET s")), "WRONGTYPE");
        assert_eq!(err_code(&run(&mut s, 0, "INCR s")), "WRONGTYPE");
        assert_eq!(err_code(&run(&mut s, 0, "SET s v GET")), "WRONGTYPE");
        assert_eq!(run(&mut s, 0, "GET k"), bulk("v"));
        assert_eq!(run(&mut s, 0, "TYPE s"), Reply::Status(Bytes::from("set")));
        assert_eq!(
            run(&mut s, 0, "SET s v"),
            Reply::ok(),
            "SET overwrites any type"
        );
    }

    #[test]
    fn hincrby_hsetnx_zcount() {
        let mut s = Store::new();
        assert_eq!(run(&mut s, 0, "HINCRBY h n -3"), Reply::Integer(-3));
        assert_eq!(run(&mut s, 0, "HGET h n"), bulk("-3"));
        assert_eq!(run(&mut s, 0, "HSETNX h n 7"), Reply::Integer(0));
        assert_eq!(run(&mut s, 0, "HSETNX h v 01"), Reply::Integer(1));
        let not_int = run(&mut s, 0, "HINCRBY h v 1");
        assert_eq!(not_int, Reply::error("ERR hash value is not an integer"));
        run(&mut s, 0, "HSET h max 9223372036854775807");
        assert_eq!(err_code(&run(&mut s, 0, "HINCRBY h max 1")), "ERR");
        run(&mut s, 0, "SET str x");
        assert_eq!(err_code(&run(&mut s, 0, "HINCRBY str f x")), "ERR");
        assert_eq!(err_code(&run(&mut s, 0, "HINCRBY str f 1")), "WRONGTYPE");
        run(&mut s, 0, "ZADD z 1 a 2 b 3 c");
        assert_eq!(run(&mut s, 0, "ZCOUNT z (1 3"), Reply::Integer(2));
        assert_eq!(run(&mut s, 0, "ZCOUNT z -inf (3"), Reply::Integer(2));
        assert_eq!(run(&mut s, 0, "ZCOUNT nope 0 1"), Reply::Integer(0));
        assert_eq!(err_code(&run(&mut s, 0, "ZCOUNT str x 1")), "ERR");
        assert_eq!(err_code(&run(&mut s, 0, "ZCOUNT str 0 1")), "WRONGTYPE");
    }

    #[test]
    fn set_nx_xx_get() {
        let mut s = Store::new();
        assert_eq!(run(&mut s, 0, "SET k a XX"), Reply::nil());
        assert_eq!(run(&mut s, 0, "SET k a NX"), Reply::ok());
        assert_eq!(run(&mut s, 0, "SET k b NX"), Reply::nil());
        assert_eq!(run(&mut s, 0, "SET k b NX GET"), bulk("a"));
        assert_eq!(run(&mut s, 0, "SET k c XX GET"), bulk("a"));
        assert_eq!(run(&mut s, 0, "GET k"), bulk("c"));
        assert_eq!(err_code(&run(&mut s, 0, "SET k c NX XX")), "ERR");
        assert_eq!(err_code(&run(&mut s, 0, "SET k c EX 0")), "ERR");
        assert_eq!(run(&mut s, 0, "SETNX k d"), Reply::Integer(0));
        assert_eq!(run(&mut s, 0, "GETDEL k"), bulk("c"));
        assert_eq!(run(&mut s, 0, "SETNX k d"), Reply::Integer(1));
    }

    #[test]
    fn multi_exec_runs_queued_commands_atomically() {
        let mut s = Store::new();
        assert_eq!(run(&mut s, 0, "MULTI"), Reply::ok());
        assert_eq!(
            run(&mut s, 0, "SET k 1"),
            Reply::Status(Bytes::from("QUEUED"))
        );
        run(&mut s, 0, "INCR k");
        run(&mut s, 0, "SADD k m");
        assert_eq!(
            run(&mut s, 0, "GET k"),
            Reply::Status(Bytes::from("QUEUED"))
        );
        let exec = run(&mut s, 0, "EXEC");
        let Reply::Array(Some(items)) = exec else {
            panic!("EXEC: {exec:?}")
        };
        assert_eq!(items.len(), 4);
        assert_eq!(items[0], Reply::ok());
        assert_eq!(items[1], Reply::Integer(2));
        assert_eq!(err_code(&items[2]), "WRONGTYPE");
        assert_eq!(items[3], bulk("2"));
        assert_eq!(err_code(&run(&mut s, 0, "EXEC")), "ERR");
    }

    #[test]
    fn multi_with_a_bad_command_aborts_and_discard_forgets() {
        let mut s = Store::new();
        run(&mut s, 0, "MULTI");
        run(&mut s, 0, "SET k 1");
        assert_eq!(err_code(&run(&mut s, 0, "GET")), "ERR");
        assert_eq!(err_code(&run(&mut s, 0, "EXEC")), "EXECABORT");
        assert_eq!(run(&mut s, 0, "GET k"), Reply::nil());
        run(&mut s, 0, "MULTI");
        run(&mut s, 0, "SET k 1");
        assert_eq!(run(&mut s, 0, "DISCARD"), Reply::ok());
        assert_eq!(run(&mut s, 0, "GET k"), Reply::nil());
    }

    #[test]
    fn sessions_subscribe_and_publish_counts_receivers() {
        let mut s = Store::new();
        let mut a = Session::new(ClientId(1));
        let mut b = Session::new(ClientId(2));
        let now = Duration::ZERO;
        s.execute_in(&mut a, now, &cmd("SUBSCRIBE ch other"));
        s.execute_in(&mut b, now, &cmd("SUBSCRIBE ch"));
        assert_eq!(
            err_code(&s.execute_in(&mut a, now, &cmd("GET k"))),
            "ERR",
            "RESP2 subscribed context"
        );
        assert_eq!(s.execute(now, &cmd("PUBLISH ch hi")), Reply::Integer(2));
        let d = s.take_deliveries();
        assert_eq!(
            d.iter().map(|d| d.client).collect::<Vec<_>>(),
            [ClientId(1), ClientId(2)]
        );
        s.disconnect(ClientId(1));
        assert_eq!(s.execute(now, &cmd("PUBLISH ch hi")), Reply::Integer(1));
        assert_eq!(s.execute(now, &cmd("PUBLISH other hi")), Reply::Integer(0));
        s.execute_in(&mut b, now, &cmd("UNSUBSCRIBE"));
        assert_eq!(s.subscriber_count(b"ch"), 0);
    }

    #[test]
    fn zsets_order_by_score_then_member() {
        let mut s = Store::new();
        run(&mut s, 0, "ZADD z 2 b 1 c 1 a 3 d");
        assert_eq!(
            run(&mut s, 0, "ZRANGE z 0 -1"),
            Reply::Array(Some(["a", "c", "b", "d"].map(bulk).to_vec()))
        );
        assert_eq!(
            run(&mut s, 0, "ZRANGEBYSCORE z (1 +inf LIMIT 1 1"),
            Reply::Array(Some(vec![bulk("d")]))
        );
        assert_eq!(
            run(&mut s, 0, "ZREMRANGEBYSCORE z -inf 1"),
            Reply::Integer(2)
        );
        assert_eq!(run(&mut s, 0, "ZCARD z"), Reply::Integer(2));
        assert_eq!(run(&mut s, 0, "ZADD z GT CH 1 b 5 d"), Reply::Integer(1));
        assert_eq!(run(&mut s, 0, "ZSCORE z d"), Reply::Double(5.0));
    }

    #[test]
    fn lists_push_range_trim() {
        let mut s = Store::new();
        run(&mut s, 0, "RPUSH l a b c");
        run(&mut s, 0, "LPUSH l x y");
        assert_eq!(
            run(&mut s, 0, "LRANGE l 0 -1"),
            Reply::Array(Some(["y", "x", "a", "b", "c"].map(bulk).to_vec()))
        );
        run(&mut s, 0, "LTRIM l 1 -2");
        assert_eq!(
            run(&mut s, 0, "LRANGE l -100 100"),
            Reply::Array(Some(["x", "a", "b"].map(bulk).to_vec()))
        );
        run(&mut s, 0, "LTRIM l 5 10");
        assert_eq!(run(&mut s, 0, "EXISTS l"), Reply::Integer(0));
    }

    #[test]
    fn parsers_follow_redis() {
        assert_eq!(parse_i64(b"-12"), Some(-12));
        assert_eq!(parse_i64(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [
            "",
            "01",
            "+1",
            "-0",
            " 1",
            "1 ",
            "9223372036854775808",
            "1.0",
        ] {
            assert_eq!(parse_i64(bad.as_bytes()), None, "{bad:?}");
        }
        assert_eq!(parse_f64(b"inf"), Some(f64::INFINITY));
        assert_eq!(parse_f64(b"-1.5e1"), Some(-15.0));
        for bad in ["", " 1", "nan", "1e400", "1e-400", "x"] {
            assert_eq!(parse_f64(bad.as_bytes()), None, "{bad:?}");
        }
        assert_eq!(format_double(0.1), "0.10000000000000001");
        assert_eq!(format_double(1.5), "1.5");
        assert_eq!(format_double(3.0), "3");
        assert_eq!(format_double(1e20), "1e+20");
        assert_eq!(format_double(123456789.123), "123456789.123");
        assert_eq!(format_double(0.0001), "0.0001");
        assert_eq!(format_double(0.00001), "1.0000000000000001e-05");
        assert_eq!(format_double(-2.5), "-2.5");
        assert!(glob_match(b"k*", b"k1"));
        assert!(glob_match(b"*", b""));
        assert!(glob_match(b"k[0-2]", b"k1"));
        assert!(!glob_match(b"k[^0-2]", b"k1"));
        assert!(glob_match(b"a*b*c", b"aXbYbZc"));
        assert!(!glob_match(b"a?c", b"ac"));
        assert!(glob_match(b"a\\*", b"a*"));
        assert!(!glob_match(b"a\\*", b"ab"));
    }

    #[test]
    fn the_command_log_holds_what_ran_in_execution_order() {
        let redis = SharedRedis::new(|| Duration::from_millis(7));
        for c in [
            "SET k v", "MULTI", "SADD k m", "INCR n", "EXEC", "MULTI", "DEL n", "DISCARD", "GET",
        ] {
            redis.execute(&cmd(c));
        }
        let log: Vec<(String, bool)> = redis
            .command_log()
            .iter()
            .map(|c| {
                let args: Vec<String> = c.args.iter().map(|a| lossy(a)).collect();
                assert_eq!(c.at, Duration::from_millis(7));
                (args.join(" "), c.failed)
            })
            .collect();
        let expected = [("SET k v", false), ("SADD k m", true), ("INCR n", false)];
        assert_eq!(log, expected.map(|(c, f)| (c.to_string(), f)));
        assert_eq!(redis.command_log_stats().executed, 3);
    }

    #[test]
    fn arity_and_unknown_commands() {
        let mut s = Store::new();
        assert_eq!(
            run(&mut s, 0, "GET"),
            Reply::error("ERR wrong number of arguments for 'get' command")
        );
        assert_eq!(
            run(&mut s, 0, "FOO a b"),
            Reply::error("ERR unknown command 'FOO', with args beginning with: 'a' 'b' ")
        );
        assert_eq!(err_code(&run(&mut s, 0, "HSET h f")), "ERR");
    }
}
