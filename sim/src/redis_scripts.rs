//! The Lua scripts the Redis model can run: each known source text paired
//! with a native transliteration, line for line, in model commands.
//!
//! The model has no Lua interpreter. `EVAL`, `EVALSHA` and `SCRIPT LOAD`
//! accept exactly the sources listed in [`KNOWN`] (by their SHA1, as Redis
//! names scripts) and run the native version; any other script is an
//! error. Each transliteration is checked against the real script on a real
//! `redis-server` by `sim/tests/redis_differential.rs`.
//!
//! Like Redis, a command that fails inside a script ends it with that
//! error, and the commands before it stay done (no rollback).
//!
//! Lua's `tonumber` on the scripts' decimal strings is a double; so is
//! [`num`] here, so comparisons agree with the real script bit for bit.

use std::sync::LazyLock;

use bytes::Bytes;
use im_server::scripts;

use crate::redis_model::Reply;

/// What a native script may do: run one command, as `redis.call` would.
pub trait Call {
    /// Runs `args`; an error reply is `Err` (the script ends with it).
    fn call(&mut self, args: &[&[u8]]) -> Result<Reply, Reply>;
}

/// A native script: (the model, KEYS, ARGV) to the script's reply.
pub type Native = fn(&mut dyn Call, &[Bytes], &[Bytes]) -> Result<Reply, Reply>;

/// Every script the model runs: source text and native version.
pub const KNOWN: &[(&str, Native)] = &[
    (scripts::STORE, store),
    (scripts::ACK, ack),
    (scripts::LEASE_REFRESH, lease_refresh),
    (scripts::GENERATION, generation),
];

/// [`KNOWN`] by SHA1 (lowercase hex).
pub static BY_SHA: LazyLock<Vec<(String, Native)>> =
    LazyLock::new(|| KNOWN.iter().map(|(src, f)| (sha1_hex(src), *f)).collect());

/// A script's name in Redis: the SHA1 of its source, lowercase hex.
pub fn sha1_hex(source: &str) -> String {
    redis::Script::new(source).get_hash().to_owned()
}

/// The native script for `sha`, if the model knows it.
pub fn native(sha: &str) -> Option<Native> {
    BY_SHA
        .iter()
        .find(|(s, _)| s.eq_ignore_ascii_case(sha))
        .map(|(_, f)| *f)
}

fn arg(v: &[Bytes], i: usize) -> Result<&[u8], Reply> {
    // Lua: a missing KEYS[i] or ARGV[i] is nil, which redis.call refuses.
    v.get(i - 1).map(|b| &b[..]).ok_or_else(|| {
        Reply::error("ERR Lua redis lib command arguments must be strings or integers")
    })
}

/// ARGV[i] compared with a string literal, as Lua's `==` (nil equals no
/// string).
fn is(v: &[Bytes], i: usize, text: &str) -> bool {
    v.get(i - 1).is_some_and(|a| &a[..] == text.as_bytes())
}

/// Lua's `tonumber` of a decimal string, as the double Lua holds. A string
/// Lua would not convert is an error here (the scripts never pass one).
fn num(bytes: &[u8]) -> Result<f64, Reply> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .ok_or_else(|| Reply::error("ERR model: tonumber of a non-number"))
}

/// A bulk reply's bytes, or `None` for nil.
fn bulk(reply: Reply) -> Option<Bytes> {
    match reply {
        Reply::Bulk(b) => b,
        _ => None,
    }
}

/// Lua's truthiness of a reply: nil (a nil bulk or array) is false.
fn present(reply: &Reply) -> bool {
    !matches!(reply, Reply::Bulk(None) | Reply::Array(None))
}

fn int(reply: &Reply) -> i64 {
    match reply {
        Reply::Integer(n) => *n,
        _ => 0,
    }
}

fn pair(status: i64, seq: Bytes) -> Result<Reply, Reply> {
    Ok(Reply::Array(Some(vec![
        Reply::Integer(status),
        Reply::bulk(seq),
    ])))
}

/// [`scripts::STORE`].
fn store(r: &mut dyn Call, keys: &[Bytes], argv: &[Bytes]) -> Result<Reply, Reply> {
    let (seq_key, inbox, dedup, user) =
        (arg(keys, 1)?, arg(keys, 2)?, arg(keys, 3)?, arg(keys, 4)?);
    if !is(argv, 6, "off")
        && let Some(seen) = bulk(r.call(&[b"GET", dedup])?)
    {
        let sp = seen.iter().position(|&b| b == b' ');
        let seq = match sp {
            Some(sp) => seen.slice(..sp),
            None => seen.clone(),
        };
        let same = sp.is_some_and(|sp| argv.get(6).is_some_and(|d| seen[sp + 1..] == d[..]));
        if is(argv, 6, "id") || same {
            return pair(0, seq);
        }
        return pair(2, seq);
    }
    if is(argv, 9, "1") && int(&r.call(&[b"EXISTS", user])?) == 0 {
        return pair(3, Bytes::from_static(b"0"));
    }
    let acked = bulk(r.call(&[b"HGET", user, b"acked"])?).unwrap_or(Bytes::from_static(b"0"));
    let total = int(&r.call(&[b"ZCARD", inbox])?);
    let mut above = b"(".to_vec();
    above.extend_from_slice(&acked);
    let waiting = int(&r.call(&[b"ZCOUNT", inbox, &above, b"+inf"])?);
    let backlog = num(arg(argv, 4)?)?;
    if backlog > 0.0 && waiting as f64 >= backlog {
        return pair(4, Bytes::from_static(b"0"));
    }
    r.call(&[b"SET", seq_key, arg(argv, 1)?, b"NX"])?;
    r.call(&[b"INCR", seq_key])?;
    let Some(seq) = bulk(r.call(&[b"GET", seq_key])?) else {
        // GET of a key INCR just wrote; nil would be a model bug.
        return Err(Reply::error("ERR model: GET after INCR gave nil"));
    };
    let mut member = seq.to_vec();
    member.push(b':');
    member.extend_from_slice(arg(argv, 2)?);
    r.call(&[b"ZADD", inbox, &seq, &member])?;
    let history = num(arg(argv, 3)?)?;
    if is(argv, 10, "window") {
        let stop = format!("{}", -1.0 - history);
        r.call(&[b"ZREMRANGEBYRANK", inbox, b"0", stop.as_bytes()])?;
    } else {
        let trim = (total - waiting) as f64 - history;
        if trim > 0.0 {
            let stop = format!("{}", trim - 1.0);
            r.call(&[b"ZREMRANGEBYRANK", inbox, b"0", stop.as_bytes()])?;
        }
    }
    let mut record = seq.to_vec();
    record.push(b' ');
    record.extend_from_slice(arg(argv, 7)?);
    r.call(&[b"SET", dedup, &record, b"PX", arg(argv, 5)?])?;
    if num(arg(argv, 8)?)? > 0.0 {
        let retention = arg(argv, 8)?;
        r.call(&[b"PEXPIRE", seq_key, retention])?;
        r.call(&[b"PEXPIRE", inbox, retention])?;
    }
    pair(1, seq)
}

/// [`scripts::ACK`].
fn ack(r: &mut dyn Call, keys: &[Bytes], argv: &[Bytes]) -> Result<Reply, Reply> {
    let user = arg(keys, 1)?;
    let acked = bulk(r.call(&[b"HGET", user, b"acked"])?);
    let seq = arg(argv, 1)?;
    let mut rose = 0;
    let higher = match &acked {
        None => true,
        Some(a) => num(seq)? > num(a)?,
    };
    if higher {
        r.call(&[b"HSET", user, b"acked", seq])?;
        rose = 1;
    }
    let retention = arg(argv, 2)?;
    if num(retention)? > 0.0 {
        r.call(&[b"PEXPIRE", user, retention])?;
    }
    Ok(Reply::Integer(rose))
}

/// [`scripts::LEASE_REFRESH`].
fn lease_refresh(r: &mut dyn Call, keys: &[Bytes], argv: &[Bytes]) -> Result<Reply, Reply> {
    let (conns, released, user) = (arg(keys, 1)?, arg(keys, 2)?, arg(keys, 3)?);
    let member = arg(argv, 1)?;
    if is(argv, 8, "1") && present(&r.call(&[b"ZSCORE", released, member])?) {
        return Ok(Reply::Integer(0));
    }
    let field = arg(argv, 6)?;
    let generation = arg(argv, 7)?;
    let newest = bulk(r.call(&[b"HGET", user, field])?);
    if is(argv, 9, "1")
        && let Some(n) = &newest
        && num(n)? > num(generation)?
    {
        return Ok(Reply::Integer(2));
    }
    let now = arg(argv, 3)?;
    r.call(&[b"ZADD", conns, arg(argv, 2)?, member])?;
    r.call(&[b"ZREMRANGEBYSCORE", conns, b"-inf", now])?;
    let lifetime = arg(argv, 4)?;
    if num(lifetime)? > 0.0 {
        r.call(&[b"PEXPIRE", conns, lifetime])?;
    }
    r.call(&[b"ZREMRANGEBYSCORE", released, b"-inf", now])?;
    let lower = match &newest {
        None => true,
        Some(n) => num(n)? < num(generation)?,
    };
    if lower {
        r.call(&[b"HSET", user, field, generation])?;
    }
    let retention = arg(argv, 5)?;
    if num(retention)? > 0.0 {
        r.call(&[b"PEXPIRE", user, retention])?;
    }
    Ok(Reply::Integer(1))
}

/// [`scripts::GENERATION`].
fn generation(r: &mut dyn Call, keys: &[Bytes], argv: &[Bytes]) -> Result<Reply, Reply> {
    let user = arg(keys, 1)?;
    let field = arg(argv, 1)?;
    let mut newest = bulk(r.call(&[b"HGET", user, field])?);
    let mut mine = Bytes::copy_from_slice(arg(argv, 2)?);
    if &mine[..] == b"0" {
        r.call(&[b"HSETNX", user, field, arg(argv, 3)?])?;
        r.call(&[b"HINCRBY", user, field, b"1"])?;
        mine = bulk(r.call(&[b"HGET", user, field])?)
            .ok_or_else(|| Reply::error("ERR model: HGET after HINCRBY gave nil"))?;
        newest = Some(mine.clone());
    } else if let Some(n) = &newest
        && num(n)? > num(&mine)?
    {
        return Ok(Reply::Array(Some(vec![
            Reply::bulk(mine),
            Reply::bulk(n.clone()),
        ])));
    } else {
        r.call(&[b"HSET", user, field, &mine])?;
        newest = Some(mine.clone());
    }
    let retention = arg(argv, 4)?;
    if num(retention)? > 0.0 {
        r.call(&[b"PEXPIRE", user, retention])?;
    }
    Ok(Reply::Array(Some(vec![
        Reply::bulk(mine),
        Reply::bulk(newest.unwrap_or_default()),
    ])))
}
