//! Every Lua script the hardened profile runs in Redis, in one place.
//!
//! Each script touches the keys of one user only (they share the user's
//! `{u:ID}` hash tag, so the same script runs on one Redis Cluster shard),
//! and each does in one atomic step what would race as several commands.
//! The simulation has no Lua: `sim/src/redis_scripts.rs` runs a native
//! transliteration of each, checked against the real script on a real
//! `redis-server` (`sim/tests/redis_differential.rs`).
//!
//! Numbers: sequence numbers and generations are 16-digit decimals (unix
//! ms × 1000 and up). Lua compares them as doubles, exact below 2^53, and
//! they are passed to and read from Redis as strings, never as Lua numbers
//! (Redis prints a Lua number with 14 significant digits).

/// Stores one message: dedup, the recipient check, the backlog limit, a
/// fresh sequence number, the insert, the trim, the dedup record and the
/// retention, atomically.
///
/// KEYS: the recipient's `seq`, `inbox`, this message's `dedup` record,
/// the recipient's `user` record.
/// ARGV: 1 the counter's start (`SET NX`), 2 the encoded envelope, 3 how
/// many acknowledged messages to keep (history), 4 the backlog limit (0:
/// none), 5 the dedup lifetime in ms, 6 the dedup mode (`digest`: a retry
/// must match the digest; `id`: the id alone; `off`), 7 the message's
/// digest, 8 the retention in ms (0: keys never expire), 9 `1` to require
/// a known recipient, 10 the trim (`acked`: only acknowledged messages
/// beyond the history; `window`: the newest `ARGV[3]` whatever they are).
///
/// Answers `{status, seq}` with `seq` a decimal string: 1 stored; 0 a
/// retry of a stored message (its seq); 2 the id was used for another
/// message (that one's seq); 3 unknown recipient; 4 the backlog is full.
///
/// A message is "acknowledged" when its sequence is at or below the
/// user record's `acked` (the highest sequence any device of the user
/// acknowledged); the messages above it are the backlog no device has.
pub const STORE: &str = r"
if ARGV[6] ~= 'off' then
  local seen = redis.call('GET', KEYS[3])
  if seen then
    local sp = string.find(seen, ' ', 1, true)
    local seq = seen
    if sp then seq = string.sub(seen, 1, sp - 1) end
    if ARGV[6] == 'id' or (sp and string.sub(seen, sp + 1) == ARGV[7]) then
      return {0, seq}
    end
    return {2, seq}
  end
end
if ARGV[9] == '1' and redis.call('EXISTS', KEYS[4]) == 0 then
  return {3, '0'}
end
local acked = redis.call('HGET', KEYS[4], 'acked')
if not acked then acked = '0' end
local total = redis.call('ZCARD', KEYS[2])
local waiting = redis.call('ZCOUNT', KEYS[2], '(' .. acked, '+inf')
if tonumber(ARGV[4]) > 0 and waiting >= tonumber(ARGV[4]) then
  return {4, '0'}
end
redis.call('SET', KEYS[1], ARGV[1], 'NX')
redis.call('INCR', KEYS[1])
local seq = redis.call('GET', KEYS[1])
redis.call('ZADD', KEYS[2], seq, seq .. ':' .. ARGV[2])
if ARGV[10] == 'window' then
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -1 - tonumber(ARGV[3]))
else
  local trim = total - waiting - tonumber(ARGV[3])
  if trim > 0 then
    redis.call('ZREMRANGEBYRANK', KEYS[2], 0, trim - 1)
  end
end
redis.call('SET', KEYS[3], seq .. ' ' .. ARGV[7], 'PX', ARGV[5])
if tonumber(ARGV[8]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[8])
  redis.call('PEXPIRE', KEYS[2], ARGV[8])
end
return {1, seq}
";

/// Raises the user's acknowledged sequence (never lowers it) and renews
/// the user record's retention.
///
/// KEYS: the user's `user` record. ARGV: 1 the acknowledged sequence,
/// 2 the retention in ms (0: no expiry). Answers 1 if it rose, else 0.
pub const ACK: &str = r"
local acked = redis.call('HGET', KEYS[1], 'acked')
local rose = 0
if not acked or tonumber(ARGV[1]) > tonumber(acked) then
  redis.call('HSET', KEYS[1], 'acked', ARGV[1])
  rose = 1
end
if tonumber(ARGV[2]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return rose
";

/// Writes or renews one connection's presence lease, unless its session
/// released it (a refresh delayed in Redis must not bring back a lease
/// the logout removed) or a newer connection of the same device exists
/// (the repair path for a supersede whose doorbell was lost).
///
/// KEYS: the user's `conns` (lease members scored by expiry), `released`
/// (released members scored by when the tombstone may go), `user` record.
/// ARGV: 1 the lease member, 2 its expiry (unix ms), 3 now (unix ms),
/// 4 the `conns` key's lifetime in ms (0: none), 5 the retention in ms
/// (0: none), 6 the device's generation field, 7 this connection's
/// generation, 8 `1` to honour tombstones, 9 `1` to check for a newer
/// generation.
///
/// Answers 1 written, 0 released (nothing written), 2 superseded (nothing
/// written). After Redis lost its data the generation is written back, so
/// the ordering of the device's connections survives.
pub const LEASE_REFRESH: &str = r"
if ARGV[8] == '1' and redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  return 0
end
local newest = redis.call('HGET', KEYS[3], ARGV[6])
if ARGV[9] == '1' and newest and tonumber(newest) > tonumber(ARGV[7]) then
  return 2
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
if tonumber(ARGV[4]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
if not newest or tonumber(newest) < tonumber(ARGV[7]) then
  redis.call('HSET', KEYS[3], ARGV[6], ARGV[7])
end
if tonumber(ARGV[5]) > 0 then
  redis.call('PEXPIRE', KEYS[3], ARGV[5])
end
return 1
";

/// Gives a login its place among its device's connections, and renews the
/// user record's retention.
///
/// KEYS: the user's `user` record. ARGV: 1 the device's generation field,
/// 2 the generation the client declared (its connection counter; `0`: the
/// server numbers it), 3 the counter's start when the server numbers
/// (unix ms × 1000), 4 the retention in ms (0: none).
///
/// Answers `{generation, newest}` as decimal strings: with a declared
/// generation below one already recorded, `newest` is that one and
/// nothing changes (the login is stale); otherwise the generation is
/// recorded and `newest` equals it.
pub const GENERATION: &str = r"
local newest = redis.call('HGET', KEYS[1], ARGV[1])
local mine = ARGV[2]
if mine == '0' then
  redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[3])
  redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
  mine = redis.call('HGET', KEYS[1], ARGV[1])
  newest = mine
elseif newest and tonumber(newest) > tonumber(mine) then
  return {mine, newest}
else
  redis.call('HSET', KEYS[1], ARGV[1], mine)
  newest = mine
end
if tonumber(ARGV[4]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return {mine, newest}
";

/// Every script, for those who must know them all (the simulation's
/// Redis model).
pub const ALL: [&str; 4] = [STORE, ACK, LEASE_REFRESH, GENERATION];
