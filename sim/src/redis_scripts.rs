//! The Lua scripts the Redis model can run: each known source text paired
//! with a native transliteration, line for line, in model commands.
//!
//! The model has no Lua interpreter. `EVAL`, `EVALSHA` and `SCRIPT LOAD`
//! accept exactly the sources listed in [`KNOWN`] (by their SHA1, as Redis
//! names scripts) and run the native version; any other script is an
//! error. Each transliteration is checked against the real script on a real
//! `redis-server` by `sim/tests/redis_differential.rs`
//! (`store_script_matches_real_redis`).
//!
//! Like Redis, a command that fails inside a script ends it with that
//! error, and the commands before it stay done (no rollback).

use std::sync::LazyLock;

use bytes::Bytes;

use crate::redis_model::Reply;

/// What a native script may do: run one command, as `redis.call` would.
pub trait Call {
    /// Runs `args`; an error reply is `Err` (the script ends with it).
    fn call(&mut self, args: &[&[u8]]) -> Result<Reply, Reply>;
}

/// A native script: (the model, KEYS, ARGV) to the script's reply.
pub type Native = fn(&mut dyn Call, &[Bytes], &[Bytes]) -> Result<Reply, Reply>;

/// Every script the model runs: source text and native version.
pub const KNOWN: &[(&str, Native)] = &[(im_server::inbox::STORE_SCRIPT, store)];

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

/// `im_server::inbox::STORE_SCRIPT`.
fn store(r: &mut dyn Call, keys: &[Bytes], argv: &[Bytes]) -> Result<Reply, Reply> {
    let (seq_key, inbox, dedup) = (arg(keys, 1)?, arg(keys, 2)?, arg(keys, 3)?);
    // if ARGV[5] == '1' then local seen = GET(KEYS[3]); if seen return {0, seen}
    if argv.get(4).is_some_and(|a| &a[..] == b"1")
        && let Reply::Bulk(Some(seen)) = r.call(&[b"GET", dedup])?
    {
        return Ok(Reply::Array(Some(vec![
            Reply::Integer(0),
            Reply::bulk(seen),
        ])));
    }
    r.call(&[b"SET", seq_key, arg(argv, 1)?, b"NX"])?;
    r.call(&[b"INCR", seq_key])?;
    let seq = match r.call(&[b"GET", seq_key])? {
        Reply::Bulk(Some(seq)) => seq,
        // GET of a key INCR just wrote; nil would be a model bug.
        other => {
            return Err(Reply::error(format!(
                "ERR model: GET after INCR gave {other:?}"
            )));
        }
    };
    let mut member = seq.to_vec();
    member.push(b':');
    member.extend_from_slice(arg(argv, 2)?);
    r.call(&[b"ZADD", inbox, &seq, &member])?;
    r.call(&[b"ZREMRANGEBYRANK", inbox, b"0", arg(argv, 3)?])?;
    r.call(&[b"SET", dedup, &seq, b"PX", arg(argv, 4)?])?;
    Ok(Reply::Array(Some(vec![
        Reply::Integer(1),
        Reply::bulk(seq),
    ])))
}
