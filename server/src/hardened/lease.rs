//! Presence leases: only a lease's own session writes it, and once
//! released it stays released.
//!
//! A lease is a member of the user's `conns` sorted set scored by its
//! expiry. Its session writes it at login and at every heartbeat
//! ([`refresh`], the [`crate::scripts::LEASE_REFRESH`] script) and releases
//! it at the end ([`release`]): the member goes, and a tombstone (a member
//! of `released` scored by when it may go, one lease lifetime later) makes
//! any refresh still on its way a no-op. A refresh computes its expiry when
//! sent, so one that runs more than a lease lifetime late writes an expired
//! lease anyway: the tombstone need not live longer.
//!
//! The refresh also learns whether a newer connection of the same device
//! exists (the device's generation in the user record is above this
//! connection's): the session then closes itself as superseded. That
//! repairs a supersede whose doorbell pub/sub lost.

use std::sync::LazyLock;

use im_proto::UserId;

use crate::Shared;
use crate::config::Bug;
use crate::redis_link::RedisError;

use super::store::Eval;
use super::{Keys, retention_ms};

/// What a refresh found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lease {
    Written,
    /// The session released it already; nothing was written.
    Released,
    /// A newer connection of the device exists; nothing was written.
    Superseded,
}

/// A lease score in the year 2100: [`Bug::NoLeaseExpiry`]'s "forever".
const NEVER_MS: u64 = 4_102_444_800_000;

static SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(crate::scripts::LEASE_REFRESH));

/// How many leases one pipeline of [`refresh_all`] rewrites.
const REFRESH_BATCH: usize = 512;

/// Rewrites every local connection's lease, right after the node reached
/// Redis again: after Redis lost its data, presence and the user records
/// (which the recipient check and supersede ordering read) come back within
/// a round trip, not at each session's next heartbeat. A lease released
/// meanwhile stays released (its tombstone), and a connection found
/// superseded is closed.
pub(crate) async fn refresh_all(shared: &Shared, node: &super::Node) -> Result<(), RedisError> {
    let entries: Vec<(UserId, String, String, u64, crate::registry::ConnHandle)> = {
        let conns = node.lock();
        conns
            .by_id
            .values()
            .map(|e| {
                (
                    e.handle.user,
                    e.key.clone(),
                    e.device.clone(),
                    e.generation,
                    e.handle.clone(),
                )
            })
            .collect()
    };
    for chunk in entries.chunks(REFRESH_BATCH) {
        let mut pipe = redis::pipe();
        // The script cache may be empty (a restarted Redis).
        pipe.cmd("SCRIPT")
            .arg("LOAD")
            .arg(crate::scripts::LEASE_REFRESH)
            .ignore();
        for (user, key, device, generation, _) in chunk {
            let call = lease_call(shared, *user, key, device, *generation);
            call.add_to(&mut pipe, false);
        }
        let outcomes: Vec<i64> = shared.redis.query_pipe(&pipe).await?;
        for ((_, key, _, _, handle), outcome) in chunk.iter().zip(outcomes) {
            if outcome == 2 {
                tracing::info!(
                    key,
                    "a newer connection of this device exists; closing as superseded"
                );
                handle.close(super::close(
                    im_proto::close_code::SUPERSEDED,
                    "superseded by a newer connection",
                ));
            }
        }
    }
    if !entries.is_empty() {
        tracing::info!(
            leases = entries.len(),
            "leases rewritten after reconnecting"
        );
    }
    Ok(())
}

/// Writes (or rewrites, after Redis lost its data) a connection's lease.
pub(crate) async fn refresh(
    shared: &Shared,
    user: UserId,
    key: &str,
    device: &str,
    generation: u64,
) -> Result<Lease, RedisError> {
    refresh_with(shared, user, key, device, generation, |_| {}).await
}

/// [`refresh`] with `tail` pipelined behind it.
pub(crate) async fn refresh_with(
    shared: &Shared,
    user: UserId,
    key: &str,
    device: &str,
    generation: u64,
    tail: impl Fn(&mut redis::Pipeline),
) -> Result<Lease, RedisError> {
    let script = lease_call(shared, user, key, device, generation);
    let (outcome,): (i64,) = script.run(shared, tail).await?;
    crate::metrics::presence_write("lease", true);
    Ok(match outcome {
        0 => Lease::Released,
        2 => Lease::Superseded,
        _ => Lease::Written,
    })
}

/// The refresh script's call for one lease.
fn lease_call<'a>(
    shared: &Shared,
    user: UserId,
    key: &str,
    device: &str,
    generation: u64,
) -> Eval<'a> {
    let cfg = &shared.config;
    let ttl = cfg.hardened.lease_ttl.as_millis() as u64;
    let now = (cfg.clock)();
    let (expires, lifetime) = if cfg.has(Bug::NoLeaseExpiry) {
        (NEVER_MS, 0)
    } else {
        (now + ttl, ttl * 2)
    };
    let k = Keys::of(cfg, user);
    let flag = |off: bool| if off { "0" } else { "1" };
    Eval::new(&SCRIPT, crate::scripts::LEASE_REFRESH)
        .key(k.conns)
        .key(k.released)
        .key(k.user)
        .arg(key)
        .arg(expires)
        .arg(now)
        .arg(lifetime)
        .arg(retention_ms(cfg))
        .arg(format!("gen:{device}"))
        .arg(generation)
        .arg(flag(cfg.has(Bug::StaleRefreshResurrects)))
        .arg(flag(cfg.has(Bug::NoSupersedeRepair)))
}

/// Releases a connection's lease for good.
pub(crate) async fn release(shared: &Shared, user: UserId, key: &str) -> Result<(), RedisError> {
    let mut pipe = redis::pipe();
    release_into(&mut pipe, shared, user, key);
    let r = shared.redis.query_pipe::<()>(&pipe).await;
    crate::metrics::presence_write("release", r.is_ok());
    r
}

/// The commands that release a lease, appended to `pipe`: the tombstone
/// first, so a refresh that slips in between finds it.
pub(crate) fn release_into(pipe: &mut redis::Pipeline, shared: &Shared, user: UserId, key: &str) {
    let cfg = &shared.config;
    let k = Keys::of(cfg, user);
    if !cfg.has(Bug::StaleRefreshResurrects) {
        let ttl = cfg.hardened.lease_ttl.as_millis() as u64;
        pipe.cmd("ZADD")
            .arg(&k.released)
            .arg((cfg.clock)() + ttl)
            .arg(key)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&k.released)
            .arg(ttl * 2)
            .ignore();
    }
    pipe.cmd("ZREM").arg(&k.conns).arg(key).ignore();
}
