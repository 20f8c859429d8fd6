//! Doorbells: the node's pub/sub, owned by one task.
//!
//! Rules (ARCHITECTURE.md, "ordering"):
//! - Only this task sends SUBSCRIBE and UNSUBSCRIBE, one command at a time,
//!   and it decides each from the connections that exist when it sends it.
//!   A login or logout only marks its user dirty. So a logout's UNSUBSCRIBE
//!   and a login's SUBSCRIBE of one user can never cross: whatever arrived
//!   meanwhile is settled by the next command, one round trip later, and a
//!   user newly subscribed has its pumps woken (a doorbell rung before the
//!   subscription was live is then read from the inbox).
//! - When redis-rs reports the connection lost, the task redials at once
//!   (with the link's backoff) and, on the new connection, subscribes every
//!   user with a connection here and wakes every pump. A node that issues
//!   no command still hears its doorbells again within one round trip of
//!   Redis answering.
//! - A supersede names the device and the new connection's generation;
//!   only connections of that device with a lower generation close.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use im_proto::{UserId, close_code};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::Shared;
use crate::config::Bug;
use crate::redis_link::{Push, RedisError};

use super::{Node, close, ring_local};

/// At most this many channels per SUBSCRIBE or UNSUBSCRIBE.
const CHANNELS_PER_COMMAND: usize = 512;

/// The node's pub/sub task: runs for the node's life.
pub(crate) async fn pubsub(shared: Arc<Shared>, node: Arc<Node>) {
    let Some(mut pushes) = node.pushes.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return;
    };
    let slow_recovery = shared.config.has(Bug::SlowRedisRecovery);
    let mut generations: watch::Receiver<u64> = shared.redis.generations();
    generations.mark_unchanged();
    let mut subscribed: BTreeSet<UserId> = BTreeSet::new();
    // When to try again after a failed dial or (un)subscribe.
    let mut retry_at: Option<Instant> = None;
    let mut backoff = Duration::from_millis(50);
    let mut reconnect = false;
    let mut ping = tokio::time::interval(shared.config.hardened.redis_ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            changed = generations.changed() => {
                if changed.is_err() {
                    return;
                }
                // A new connection: subscriptions died with the old one,
                // and doorbells may have been missed meanwhile.
                tracing::info!("redis reconnected: resubscribing");
                subscribed.clear();
                if !slow_recovery
                    && let Err(e) = super::lease::refresh_all(&shared, &node).await
                {
                    tracing::warn!(error = %e, "leases not rewritten; each session's next refresh will");
                }
                let users: Vec<UserId> = node.lock().by_user.keys().copied().collect();
                for user in users {
                    node.subscription_changed(user);
                }
                reconnect = false;
            }
            push = pushes.recv() => match push {
                None => return,
                Some(Push { generation, info }) if info.kind == redis::PushKind::Disconnection => {
                    if slow_recovery {
                        continue;
                    }
                    shared.redis.lost(generation).await;
                    reconnect = true;
                }
                Some(Push { info, .. }) => {
                    on_push(&shared, &node, info);
                    continue;
                }
            },
            _ = node.resubscribe.notified() => {}
            _ = ping.tick(), if !slow_recovery => {
                // A timeout discards the connection (the link's rule), so
                // the settle below dials a new one and resubscribes.
                let alive = shared.redis.query::<String>(&redis::cmd("PING")).await;
                if let Err(e) = alive {
                    tracing::warn!(error = %e, "redis did not answer a PING; redialing");
                    reconnect = true;
                }
            }
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                retry_at = None;
            }
        }
        if retry_at.is_some() {
            continue;
        }
        let settled = if reconnect {
            shared.redis.connect_now().await
        } else {
            match settle(&shared, &node, &mut subscribed).await {
                Ok(()) => super::retry_releases(&shared, &node).await,
                Err(e) => Err(e),
            }
        };
        match settled {
            Ok(()) => backoff = Duration::from_millis(50),
            Err(RedisError::Backoff { retry_in }) => retry_at = Some(Instant::now() + retry_in),
            Err(e) => {
                tracing::warn!(error = %e, "pub/sub: will retry");
                retry_at = Some(Instant::now() + backoff);
                backoff = (backoff * 2).min(shared.config.hardened.heartbeat_interval);
            }
        }
    }
}

/// Makes each dirty user's subscription match its local connections as
/// they are now; repeats until nothing is dirty.
async fn settle(
    shared: &Shared,
    node: &Node,
    subscribed: &mut BTreeSet<UserId>,
) -> Result<(), RedisError> {
    loop {
        let dirty: Vec<UserId> = {
            let mut dirty = node.dirty.lock().unwrap_or_else(|e| e.into_inner());
            let batch: Vec<UserId> = dirty.iter().take(CHANNELS_PER_COMMAND).copied().collect();
            for u in &batch {
                dirty.remove(u);
            }
            batch
        };
        if dirty.is_empty() {
            return Ok(());
        }
        let (join, leave): (Vec<UserId>, Vec<UserId>) = dirty
            .iter()
            .copied()
            .filter(|u| node.has_local(*u) != subscribed.contains(u))
            .partition(|u| node.has_local(*u));
        let bells = |users: &[UserId]| -> Vec<String> {
            users
                .iter()
                .map(|u| shared.config.user_key(*u, "bell"))
                .collect()
        };
        let result = async {
            if !join.is_empty() {
                shared.redis.subscribe(&bells(&join)).await?;
                subscribed.extend(join.iter().copied());
                for user in &join {
                    ring_local(node, *user);
                }
            }
            if !leave.is_empty() {
                shared.redis.unsubscribe(&bells(&leave)).await?;
                for user in &leave {
                    subscribed.remove(user);
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            let mut again = node.dirty.lock().unwrap_or_else(|e| e.into_inner());
            again.extend(dirty);
            return Err(e);
        }
    }
}

fn on_push(shared: &Shared, node: &Node, push: redis::PushInfo) {
    if push.kind != redis::PushKind::Message {
        return;
    }
    let (Some(channel), Some(payload)) = (push.data.first(), push.data.get(1)) else {
        return;
    };
    let (Ok(channel), Ok(payload)) = (
        redis::from_redis_value_ref::<String>(channel),
        redis::from_redis_value_ref::<String>(payload),
    ) else {
        return;
    };
    let prefix = format!("{}im:{{u:", shared.config.key_prefix);
    let Some(user) = channel
        .strip_prefix(&prefix)
        .and_then(|rest| rest.strip_suffix("}:bell"))
        .and_then(|id| id.parse().ok())
        .map(UserId)
    else {
        return;
    };
    match payload.split_once(' ') {
        Some(("supersede", rest)) => {
            let mut parts = rest.splitn(3, ' ');
            let (Some(device), Some(generation), Some(newer)) = (
                parts.next(),
                parts.next().and_then(|g| g.parse::<u64>().ok()),
                parts.next(),
            ) else {
                return;
            };
            let cfg = &shared.config;
            if cfg.has(Bug::NoSupersede) {
                return;
            }
            let conns = node.lock();
            for id in conns.by_user.get(&user).into_iter().flatten() {
                let Some(e) = conns.by_id.get(id) else {
                    continue;
                };
                let older = if cfg.has(Bug::UnorderedSupersede) {
                    e.key != newer
                } else {
                    e.generation < generation
                };
                if e.device == device && older {
                    tracing::info!(
                        conn_id = id.0,
                        newer,
                        "superseded by a connection on another node"
                    );
                    e.handle.close(close(
                        close_code::SUPERSEDED,
                        "superseded by a newer connection",
                    ));
                }
            }
        }
        // A bell this node rang itself: its pumps were woken directly.
        Some(("stored", origin)) if origin == node.origin(&shared.config) => {}
        _ => ring_local(node, user),
    }
}
