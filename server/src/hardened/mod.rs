//! The hardened profile: what the seed's fix lacks.
//!
//! - Identity: every connection has its own key (`node/incarnation/conn/
//!   device`) and a generation, a per-device counter in Redis taken at
//!   login; cleanup touches exactly its own connection, locally and in
//!   Redis. A connection supersedes the older connections of its device
//!   (close 4001), on this node directly, on others by a doorbell, and, if
//!   that doorbell is lost, at the older one's next lease refresh. Only an
//!   older generation is ever superseded.
//! - Presence ([`lease`]): a lease per connection, a member of the user's
//!   sorted set `im:{u:ID}:conns` scored by its expiry (unix ms), refreshed
//!   by its holder every heartbeat interval, removed by its holder at the
//!   end, and a tombstone so a refresh delayed in Redis cannot bring it
//!   back. A crashed node's leases run out by themselves. No global set.
//! - Delivery ([`store`], [`pump`]): "sent" means stored in the
//!   recipient's inbox `im:{u:ID}:inbox` at a sequence number. Each
//!   connection has a pump that pushes everything after its cursor, woken
//!   by a doorbell and by a poll every heartbeat interval. A message no
//!   device of the recipient has acknowledged is never trimmed; when too
//!   many wait, new sends are refused (retry later), never taken back.
//! - Doorbells ([`doorbell`]): one task per node owns the node's pub/sub
//!   subscriptions, deciding each from the connections that exist when the
//!   command is sent, and redials Redis as soon as the connection is lost.
//! - Every key names one user and carries the `{u:ID}` hash tag, so the
//!   same code runs on Redis Cluster; no command spans two users.

mod doorbell;
mod lease;
mod pump;
mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use im_proto::pb::{self, ErrorCode};
use im_proto::{ConnId, UserId, close_code};
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::Shared;
use crate::config::{Bug, Config};
use crate::redis_link::{Push, RedisError};
use crate::registry::{Closing, ConnHandle};

pub(crate) use doorbell::pubsub;
pub(crate) use lease::{Lease, refresh as refresh_lease};
pub(crate) use store::{Refused, store};

use pump::Wake;

pub(crate) fn close(code: u16, reason: &str) -> Closing {
    Closing::Frame(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    })
}

/// The Redis keys of one user (all share the `{u:ID}` hash tag).
pub(crate) struct Keys {
    /// Presence leases: member = connection key, score = expiry.
    pub conns: String,
    /// Released leases' tombstones: score = when the tombstone may go.
    pub released: String,
    /// The user record: `acked` (highest acknowledged sequence), and
    /// `gen:<device>` (the device's latest connection generation).
    pub user: String,
    /// The sequence counter.
    pub seq: String,
    /// The inbox, scored by sequence.
    pub inbox: String,
    /// The pub/sub channel that wakes the user's connections.
    pub bell: String,
}

impl Keys {
    pub(crate) fn of(cfg: &Config, user: UserId) -> Keys {
        Keys {
            conns: cfg.user_key(user, "conns"),
            released: cfg.user_key(user, "released"),
            user: cfg.user_key(user, "user"),
            seq: cfg.user_key(user, "seq"),
            inbox: cfg.user_key(user, "inbox"),
            bell: cfg.user_key(user, "bell"),
        }
    }
}

/// One local connection.
struct Entry {
    device: String,
    generation: u64,
    key: String,
    handle: ConnHandle,
    wake: Arc<Wake>,
}

/// This node's connections, by id and by user.
#[derive(Default)]
struct Conns {
    by_id: BTreeMap<ConnId, Entry>,
    by_user: BTreeMap<UserId, BTreeSet<ConnId>>,
}

/// The hardened profile's per-node state.
pub(crate) struct Node {
    conns: Mutex<Conns>,
    /// Distinguishes this run of the node from earlier ones (conn ids
    /// restart at 1 after a restart; lease members must not collide).
    incarnation: u64,
    pushes: Mutex<Option<mpsc::Receiver<Push>>>,
    /// Users whose bell subscription may no longer match their local
    /// connections; the pub/sub task settles them.
    dirty: Mutex<BTreeSet<UserId>>,
    /// Leases whose release failed (Redis away), with the unix ms after
    /// which they will have expired anyway; the pub/sub task retries them
    /// as soon as Redis answers, so a logout during an outage does not
    /// leave its user online for a whole lease lifetime.
    unreleased: Mutex<BTreeMap<(UserId, String), u64>>,
    resubscribe: Notify,
}

impl Node {
    pub(crate) fn new(incarnation: u64, pushes: mpsc::Receiver<Push>) -> Node {
        Node {
            conns: Mutex::new(Conns::default()),
            incarnation,
            pushes: Mutex::new(Some(pushes)),
            dirty: Mutex::new(BTreeSet::new()),
            unreleased: Mutex::new(BTreeMap::new()),
            resubscribe: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Conns> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This run of this node, as named in the doorbells it rings.
    fn origin(&self, cfg: &Config) -> String {
        format!("{}/{}", cfg.node, self.incarnation)
    }

    /// `user`'s local connections changed: the pub/sub task re-decides
    /// the user's subscription from what exists when it acts.
    fn subscription_changed(&self, user: UserId) {
        self.dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(user);
        self.resubscribe.notify_one();
    }

    fn has_local(&self, user: UserId) -> bool {
        self.lock().by_user.contains_key(&user)
    }
}

/// What a logged-in hardened connection keeps in its session.
pub(crate) struct Attached {
    pub user: UserId,
    pub device: String,
    /// This connection's place among its device's connections.
    pub generation: u64,
    pub key: String,
    /// Highest sequence pushed to this connection (acks above it are bogus).
    pub pushed: Arc<AtomicU64>,
    pub pump: tokio::task::JoinHandle<()>,
    pub heartbeat_nonce: u64,
    /// Highest sequence the device acknowledged on this connection.
    pub acked: u64,
    /// Highest acknowledged sequence written to Redis.
    pub acked_written: u64,
}

/// Why a hardened login was refused: error code, close code, detail.
pub(crate) type Refusal = (ErrorCode, CloseCode, String);

/// A device id the server accepts: the default when empty, else at most
/// `device_id_bytes_max` ASCII letters, digits, '-', '_' or '.'.
fn device_id(cfg: &Config, given: &str) -> Result<String, Refusal> {
    if given.is_empty() {
        return Ok("default".to_owned());
    }
    if cfg.has(Bug::UnlimitedStrings) {
        return Ok(given.to_owned());
    }
    let max = cfg.hardened.device_id_bytes_max;
    let ok = given.len() <= max
        && given
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(given.to_owned())
    } else {
        Err((
            ErrorCode::Limit,
            CloseCode::Policy,
            format!(
                "device id must be 1 to {max} bytes of ASCII letters, digits, '-', '_' or '.' ({} bytes given)",
                given.len()
            ),
        ))
    }
}

/// Authenticates, takes the device's next generation, registers, leases,
/// announces, and starts the pump. Two Redis round trips.
pub(crate) async fn login(
    shared: &Arc<Shared>,
    node: &Node,
    conn_id: ConnId,
    handle: &ConnHandle,
    login: pb::Login,
) -> Result<(Attached, pb::LoginOk), Refusal> {
    let cfg = &shared.config;
    let h = cfg.hardened;
    let secret = cfg.auth_secret.as_deref().unwrap_or_default();
    let now_s = (cfg.clock)() / 1000;
    let verify = if cfg.has(Bug::LenientTokens) {
        im_proto::token::verify_lenient
    } else {
        im_proto::token::verify
    };
    let user = verify(secret, &login.token, now_s).map_err(|e| {
        (
            ErrorCode::Unauthorized,
            CloseCode::Policy,
            format!("login refused: {e}"),
        )
    })?;
    let device = device_id(cfg, &login.device_id)?;
    let unavailable = |e: RedisError| {
        (
            ErrorCode::Unavailable,
            CloseCode::Again,
            format!("storage unavailable: {e}"),
        )
    };
    let k = Keys::of(cfg, user);
    let generation_field = format!("gen:{device}");
    let start = store::seq_start_value(shared);
    let retention = retention_ms(cfg);
    // The counter's start, the inbox's two ends, and this connection's
    // generation: the client's connection counter when it declares one (a
    // login delayed in the network then cannot outrank the device's newer
    // connection), else numbered here in arrival order from the clock (so
    // that after Redis lost its data a new connection still outranks an
    // old one).
    let declared = if cfg.has(Bug::SupersedeByArrival) {
        0
    } else {
        login.connection_seq
    };
    let generation_call = store::Eval::new(&GENERATION_SCRIPT, crate::scripts::GENERATION)
        .key(k.user.clone())
        .arg(&generation_field)
        .arg(declared)
        .arg(start)
        .arg(retention);
    let (last, first, (generation, newest)): (u64, Vec<Vec<u8>>, (u64, u64)) = generation_call
        .run_in(shared, |pipe, call| {
            pipe.cmd("SET")
                .arg(&k.seq)
                .arg(start)
                .arg("NX")
                .ignore()
                .cmd("GET")
                .arg(&k.seq)
                .cmd("ZRANGE")
                .arg(&k.inbox)
                .arg(0)
                .arg(0);
            call(pipe);
            if retention > 0 {
                pipe.cmd("PEXPIRE").arg(&k.seq).arg(retention).ignore();
            }
        })
        .await
        .map_err(unavailable)?;
    if newest > generation {
        return Err(superseded_at_login(&format!(
            "this login's connection_seq {generation} is below the device's {newest}"
        )));
    }
    let first = first
        .first()
        .and_then(|m| crate::inbox::entry_seq(m).ok())
        .unwrap_or(0);
    if login.resume_after_seq > last {
        return Err((
            ErrorCode::BadSequence,
            CloseCode::Policy,
            format!(
                "resume point {} is after the inbox's last message {last}",
                login.resume_after_seq
            ),
        ));
    }
    let key = format!("{}/{}/{}/{device}", cfg.node, node.incarnation, conn_id.0);
    let handle = handle.clone().for_user(user);
    let wake = Arc::new(Wake::default());
    let registered = register(
        cfg,
        node,
        user,
        conn_id,
        Entry {
            device: device.clone(),
            generation,
            key: key.clone(),
            handle: handle.clone(),
            wake: wake.clone(),
        },
    );
    let first_here = match registered {
        Ok(first_here) => first_here,
        Err(newer) => {
            return Err(superseded_at_login(&newer));
        }
    };
    if cfg.has(Bug::SubscriptionRace) {
        // The historical order: decide now, subscribe a round trip later.
        if first_here && let Err(e) = shared.redis.subscribe(std::slice::from_ref(&k.bell)).await {
            tracing::warn!(error = %e, "subscribe failed; the inbox poll will cover");
        }
    } else {
        node.subscription_changed(user);
    }
    // The lease, and the announcement that supersedes older connections of
    // this device on other nodes, in one round trip.
    let announce = format!("supersede {device} {generation} {key}");
    let lease = lease::refresh_with(shared, user, &key, &device, generation, |pipe| {
        pipe.cmd("PUBLISH").arg(&k.bell).arg(&announce).ignore();
    })
    .await;
    match lease {
        Ok(Lease::Written) => {}
        Ok(Lease::Superseded) => {
            unregister(node, user, conn_id);
            node.subscription_changed(user);
            return Err(superseded_at_login(&key));
        }
        Ok(Lease::Released) => {
            tracing::error!(key, "a new connection's lease is already released")
        }
        Err(e) => {
            tracing::warn!(error = %e, "presence lease not written; the next refresh retries")
        }
    }
    let resume_from = if cfg.has(Bug::NoResume) {
        last
    } else {
        login.resume_after_seq
    };
    let pushed = Arc::new(AtomicU64::new(resume_from));
    let pump = tokio::spawn(pump::pump(
        shared.clone(),
        user,
        handle,
        wake,
        pushed.clone(),
    ));
    let ok = pb::LoginOk {
        conn_id: conn_id.0,
        user_id: user.0,
        heartbeat_interval_ms: h.heartbeat_interval.as_millis() as u32,
        heartbeat_timeout_ms: h.heartbeat_timeout.as_millis() as u32,
        inbox_last_seq: last,
        inbox_first_seq: first,
    };
    tracing::info!(
        user = user.0,
        device,
        generation,
        key,
        resume_after = login.resume_after_seq,
        "hardened login"
    );
    Ok((
        Attached {
            user,
            device,
            generation,
            key,
            pushed,
            pump,
            heartbeat_nonce: 0,
            acked: resume_from,
            acked_written: resume_from,
        },
        ok,
    ))
}

fn superseded_at_login(newer: &str) -> Refusal {
    (
        ErrorCode::GoingAway,
        CloseCode::from(close_code::SUPERSEDED),
        format!("superseded: a newer connection of this device exists ({newer})"),
    )
}

/// Registers a connection locally and closes the older connections of its
/// device here. `Ok(first_here)`, or `Err(key)` of a newer connection of
/// the same device already here (this one is then not registered).
fn register(
    cfg: &Config,
    node: &Node,
    user: UserId,
    conn_id: ConnId,
    entry: Entry,
) -> Result<bool, String> {
    let ordered = !cfg.has(Bug::UnorderedSupersede);
    let (superseded, first_here) = {
        let mut conns = node.lock();
        let mine: Vec<ConnId> = conns
            .by_user
            .get(&user)
            .into_iter()
            .flatten()
            .copied()
            .collect();
        let same_device: Vec<&Entry> = mine
            .iter()
            .filter_map(|id| conns.by_id.get(id))
            .filter(|e| e.device == entry.device)
            .collect();
        if ordered && let Some(newer) = same_device.iter().find(|e| e.generation > entry.generation)
        {
            return Err(newer.key.clone());
        }
        let superseded: Vec<ConnHandle> = if cfg.has(Bug::NoSupersede) {
            Vec::new()
        } else {
            same_device.iter().map(|e| e.handle.clone()).collect()
        };
        conns.by_user.entry(user).or_default().insert(conn_id);
        conns.by_id.insert(conn_id, entry);
        (superseded, mine.is_empty())
    };
    for old in superseded {
        tracing::info!(
            old_conn_id = old.conn_id.0,
            "superseded by a newer connection of the same device"
        );
        old.close(close(
            close_code::SUPERSEDED,
            "superseded by a newer connection",
        ));
    }
    Ok(first_here)
}

/// Removes a local entry; true when it was the user's last one here.
fn unregister(node: &Node, user: UserId, conn_id: ConnId) -> bool {
    let mut conns = node.lock();
    conns.by_id.remove(&conn_id);
    let mine = conns.by_user.entry(user).or_default();
    mine.remove(&conn_id);
    let empty = mine.is_empty();
    if empty {
        conns.by_user.remove(&user);
    }
    empty
}

/// The retention in ms (0: keys never expire).
fn retention_ms(cfg: &Config) -> u64 {
    if cfg.has(Bug::UnknownRecipientsStored) {
        0
    } else {
        cfg.hardened.retention.as_millis() as u64
    }
}

/// Ends a connection's presence: exactly its own lease and local entry,
/// after writing its last acknowledgements.
pub(crate) async fn logout(shared: &Shared, node: &Node, conn_id: ConnId, mut attached: Attached) {
    attached.pump.abort();
    let last_here = unregister(node, attached.user, conn_id);
    let cfg = &shared.config;
    // The `subscription_race` bug decides here and unsubscribes after the
    // lease's round trip, as the historical logout did.
    let unsubscribe_late = last_here && cfg.has(Bug::SubscriptionRace);
    if last_here && !unsubscribe_late {
        node.subscription_changed(attached.user);
    }
    if cfg.has(Bug::Phase3CleanupByUser) {
        // The seed's RemoveWebSocketConnection(userID): everything of the
        // user's goes, including connections newer than this one.
        let others: Vec<ConnHandle> = {
            let conns = node.lock();
            conns
                .by_user
                .get(&attached.user)
                .into_iter()
                .flatten()
                .filter_map(|id| conns.by_id.get(id))
                .map(|e| e.handle.clone())
                .collect()
        };
        for h in others {
            h.close(close(1000, "cleanup by user id"));
        }
        let del = redis::cmd("DEL")
            .arg(cfg.user_key(attached.user, "conns"))
            .clone();
        let _ = shared.redis.query::<i64>(&del).await;
    }
    if let Err(e) = flush_acks(shared, &mut attached).await {
        tracing::warn!(error = %e, "last acknowledgements not written");
    }
    if cfg.has(Bug::Phase1Cleanup) {
        tracing::info!(key = attached.key, "lease left in place");
    } else {
        match lease::release(shared, attached.user, &attached.key).await {
            Ok(()) => tracing::info!(key = attached.key, "lease removed"),
            Err(e) => {
                tracing::warn!(key = attached.key, error = %e, "lease not removed; retried when Redis answers");
                let expires = (cfg.clock)() + cfg.hardened.lease_ttl.as_millis() as u64;
                node.unreleased
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert((attached.user, attached.key.clone()), expires);
                node.resubscribe.notify_one();
            }
        }
    }
    if unsubscribe_late {
        let bell = cfg.user_key(attached.user, "bell");
        if let Err(e) = shared.redis.unsubscribe(&[bell]).await {
            tracing::debug!(error = %e, "unsubscribe failed");
        }
    }
}

/// After the grace period of a shutdown, the sessions still running are
/// dropped without their logout: release the leases they left, in one
/// round trip, so the drain leaves nobody online.
pub(crate) async fn release_leftovers(shared: &Shared, node: &Node) {
    let left: Vec<(UserId, String)> = {
        let conns = node.lock();
        conns
            .by_id
            .values()
            .map(|e| (e.handle.user, e.key.clone()))
            .collect()
    };
    if left.is_empty() || shared.config.has(Bug::Phase1Cleanup) {
        return;
    }
    let mut pipe = redis::pipe();
    for (user, key) in &left {
        lease::release_into(&mut pipe, shared, *user, key);
    }
    match shared.redis.query_pipe::<()>(&pipe).await {
        Ok(()) => tracing::info!(
            leases = left.len(),
            "released leases of dropped connections"
        ),
        Err(e) => tracing::warn!(error = %e, "leases of dropped connections expire by themselves"),
    }
}

/// Retries the releases that failed; those whose lease has expired by
/// now are dropped. Called by the pub/sub task.
async fn retry_releases(shared: &Shared, node: &Node) -> Result<(), RedisError> {
    let now = (shared.config.clock)();
    let due: Vec<(UserId, String)> = {
        let mut unreleased = node.unreleased.lock().unwrap_or_else(|e| e.into_inner());
        unreleased.retain(|_, expires| *expires > now);
        unreleased.keys().cloned().collect()
    };
    if due.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    for (user, key) in &due {
        lease::release_into(&mut pipe, shared, *user, key);
    }
    shared.redis.query_pipe::<()>(&pipe).await?;
    tracing::info!(
        leases = due.len(),
        "released leases whose release had failed"
    );
    let mut unreleased = node.unreleased.lock().unwrap_or_else(|e| e.into_inner());
    for k in &due {
        unreleased.remove(k);
    }
    Ok(())
}

/// Records an acknowledgement from the device; writes the highest one to
/// Redis every `ack_write_every` acks (the backlog limit and the trim read
/// it there).
pub(crate) async fn ack(
    shared: &Shared,
    attached: &mut Attached,
    seq: u64,
) -> Result<(), RedisError> {
    attached.acked = attached.acked.max(seq);
    if attached.acked >= attached.acked_written + shared.config.hardened.ack_write_every {
        flush_acks(shared, attached).await?;
    }
    Ok(())
}

/// Writes the highest acknowledged sequence if it has not been written.
pub(crate) async fn flush_acks(shared: &Shared, attached: &mut Attached) -> Result<(), RedisError> {
    if attached.acked <= attached.acked_written {
        return Ok(());
    }
    let cfg = &shared.config;
    let acked = attached.acked;
    let script = store::Eval::new(&ACK_SCRIPT, crate::scripts::ACK)
        .key(cfg.user_key(attached.user, "user"))
        .arg(acked)
        .arg(retention_ms(cfg));
    let _: (i64,) = script.run(shared, |_| {}).await?;
    attached.acked_written = acked;
    Ok(())
}

static GENERATION_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(crate::scripts::GENERATION));

static ACK_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(crate::scripts::ACK));

/// Wakes `user`'s pumps on this node to read the inbox.
fn ring_local(node: &Node, user: UserId) {
    let conns = node.lock();
    for id in conns.by_user.get(&user).into_iter().flatten() {
        if let Some(e) = conns.by_id.get(id) {
            e.wake.ring();
        }
    }
}

/// Hands a message just stored at `seq` to `user`'s pumps on this node.
fn hand_local(node: &Node, user: UserId, seq: u64, frame: &bytes::Bytes) {
    let conns = node.lock();
    for id in conns.by_user.get(&user).into_iter().flatten() {
        if let Some(e) = conns.by_id.get(id) {
            e.wake.hand(seq, frame);
        }
    }
}
