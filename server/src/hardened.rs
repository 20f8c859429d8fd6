//! The hardened profile: what the seed's fix lacks.
//!
//! - Identity: every connection has its own key (`node/incarnation/conn/
//!   device`); cleanup touches exactly its own connection, locally and in
//!   Redis. A newer connection of the same device supersedes the older one
//!   (close 4001), on this node directly and on others by a doorbell.
//! - Presence: a lease per connection, a member of the user's sorted set
//!   `im:{u:ID}:conns` scored by its expiry (unix ms), refreshed by its
//!   holder every heartbeat interval, removed by its holder at the end. A
//!   crashed node's leases run out by themselves. No global set.
//! - Delivery: "sent" means stored in the recipient's inbox
//!   `im:{u:ID}:inbox` at a sequence number from `im:{u:ID}:seq`. Each
//!   connection has a pump that pushes everything after its cursor (the
//!   device's resume point at login), woken by a doorbell (pub/sub on
//!   `im:{u:ID}:bell`) and by a poll every heartbeat interval, since
//!   doorbells may be lost. A message stored on the pump's own node is
//!   handed over with its frame and pushed without a Redis read when it
//!   continues the cursor (a user's numbers are consecutive); a gap means
//!   the inbox holds more, and the pump reads it. Retries are
//!   deduplicated by `im:{u:ID}:dedup:FROM:CLIENT_MSG_ID`.
//! - Every key names one user and carries the `{u:ID}` hash tag, so the
//!   same code runs on Redis Cluster; no command spans two users.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use im_proto::pb::{self, ErrorCode};
use im_proto::{ConnId, UserId};
use tokio::sync::{Notify, mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::Shared;
use crate::config::{Bug, Config};
use crate::inbox;
use crate::redis_link::RedisError;
use crate::registry::{Closing, ConnHandle, WriteError};

use im_proto::close_code;

pub(crate) fn close(code: u16, reason: &str) -> Closing {
    Closing::Frame(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    })
}

/// One local connection.
struct Entry {
    device: String,
    key: String,
    handle: ConnHandle,
    wake: Arc<Wake>,
}

/// How a connection's pump learns there is something to push.
#[derive(Default)]
pub(crate) struct Wake {
    notify: Notify,
    /// Messages stored on this node for this user, with their frames: the
    /// pump pushes one without reading Redis when it continues its cursor
    /// (sequence numbers of a user are consecutive: the store script
    /// numbers only what it inserts). Bounded by [`HANDED_MAX`].
    handed: Mutex<VecDeque<(u64, bytes::Bytes)>>,
    /// The inbox may hold something no hand-off carries (a doorbell from
    /// another node, a resubscribe, a hand-off dropped): read Redis.
    read: std::sync::atomic::AtomicBool,
}

/// Hand-offs waiting per connection; more are dropped (and the pump reads
/// Redis instead).
const HANDED_MAX: usize = 64;

impl Wake {
    fn handed(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, bytes::Bytes)>> {
        self.handed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Something may be in the inbox: the pump reads Redis.
    fn ring(&self) {
        self.read.store(true, Ordering::Relaxed);
        self.notify.notify_one();
    }

    /// `frame` was stored at `seq`.
    fn hand(&self, seq: u64, frame: &bytes::Bytes) {
        {
            let mut handed = self.handed();
            if handed.len() < HANDED_MAX {
                handed.push_back((seq, frame.clone()));
            } else {
                self.read.store(true, Ordering::Relaxed);
            }
        }
        self.notify.notify_one();
    }
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
    pushes: Mutex<Option<mpsc::Receiver<redis::PushInfo>>>,
}

impl Node {
    pub(crate) fn new(incarnation: u64, pushes: mpsc::Receiver<redis::PushInfo>) -> Node {
        Node {
            conns: Mutex::new(Conns::default()),
            incarnation,
            pushes: Mutex::new(Some(pushes)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Conns> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This run of this node, as named in the doorbells it rings.
    fn origin(&self, cfg: &crate::Config) -> String {
        format!("{}/{}", cfg.node, self.incarnation)
    }
}

/// What a logged-in hardened connection keeps in its session.
pub(crate) struct Attached {
    pub user: UserId,
    pub key: String,
    /// Highest sequence pushed to this connection (acks above it are bogus).
    pub pushed: Arc<AtomicU64>,
    pub pump: tokio::task::JoinHandle<()>,
    pub heartbeat_nonce: u64,
}

/// Why a hardened login was refused: error code, close code, detail.
pub(crate) type Refusal = (ErrorCode, CloseCode, String);

/// Authenticates, registers, leases, subscribes, and starts the pump.
pub(crate) async fn login(
    shared: &Arc<Shared>,
    node: &Node,
    conn_id: ConnId,
    handle: &ConnHandle,
    login: pb::Login,
) -> Result<(Attached, pb::LoginOk), Refusal> {
    let cfg = &shared.config;
    let secret = cfg.auth_secret.as_deref().unwrap_or_default();
    let now_s = (cfg.clock)() / 1000;
    let user = im_proto::token::verify(secret, &login.token, now_s).map_err(|e| {
        (
            ErrorCode::Unauthorized,
            CloseCode::Policy,
            format!("login refused: {e}"),
        )
    })?;
    let device = if login.device_id.is_empty() {
        "default".to_owned()
    } else {
        login.device_id.clone()
    };
    let unavailable = |e: RedisError| {
        (
            ErrorCode::Unavailable,
            CloseCode::Again,
            format!("storage unavailable: {e}"),
        )
    };
    let last: u64 = shared
        .redis
        .query_pipe::<(u64,)>(
            &seq_start(shared, user)
                .cmd("GET")
                .arg(cfg.user_key(user, "seq"))
                .clone(),
        )
        .await
        .map_err(unavailable)?
        .0;
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
    let (superseded, first_here) = {
        let mut conns = node.lock();
        let mine: Vec<ConnId> = conns
            .by_user
            .get(&user)
            .into_iter()
            .flatten()
            .copied()
            .collect();
        let first_here = mine.is_empty();
        let superseded: Vec<ConnHandle> = mine
            .iter()
            .filter_map(|id| conns.by_id.get(id))
            .filter(|e| e.device == device && !cfg.has(Bug::NoSupersede))
            .map(|e| e.handle.clone())
            .collect();
        conns.by_user.entry(user).or_default().insert(conn_id);
        conns.by_id.insert(
            conn_id,
            Entry {
                device: device.clone(),
                key: key.clone(),
                handle: handle.clone(),
                wake: wake.clone(),
            },
        );
        (superseded, first_here)
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
    if first_here && let Err(e) = shared.redis.subscribe(&cfg.user_key(user, "bell")).await {
        tracing::warn!(error = %e, "subscribe failed; the inbox poll will cover");
    }
    if let Err(e) = refresh_lease(shared, user, &key).await {
        tracing::warn!(error = %e, "presence lease not written; the next refresh retries");
    }
    let bell = redis::cmd("PUBLISH")
        .arg(cfg.user_key(user, "bell"))
        .arg(format!("supersede {device} {key}"))
        .clone();
    if let Err(e) = shared.redis.query::<i64>(&bell).await {
        tracing::warn!(error = %e, "could not announce the new connection to other nodes");
    }
    let resume_from = if cfg.has(Bug::NoResume) {
        last
    } else {
        login.resume_after_seq
    };
    let pushed = Arc::new(AtomicU64::new(resume_from));
    let pump = tokio::spawn(pump(shared.clone(), user, handle, wake, pushed.clone()));
    let h = cfg.hardened;
    let ok = pb::LoginOk {
        conn_id: conn_id.0,
        user_id: user.0,
        heartbeat_interval_ms: h.heartbeat_interval.as_millis() as u32,
        heartbeat_timeout_ms: h.heartbeat_timeout.as_millis() as u32,
        inbox_last_seq: last,
    };
    tracing::info!(
        user = user.0,
        device,
        key,
        resume_after = login.resume_after_seq,
        "hardened login"
    );
    Ok((
        Attached {
            user,
            key,
            pushed,
            pump,
            heartbeat_nonce: 0,
        },
        ok,
    ))
}

/// Writes (or rewrites, after Redis lost its data) this connection's lease.
pub(crate) async fn refresh_lease(
    shared: &Shared,
    user: UserId,
    key: &str,
) -> Result<(), RedisError> {
    let cfg = &shared.config;
    let ttl = cfg.hardened.lease_ttl;
    let expires = if cfg.has(Bug::NoLeaseExpiry) {
        NEVER_MS
    } else {
        (cfg.clock)() + ttl.as_millis() as u64
    };
    let conns = cfg.user_key(user, "conns");
    let mut pipe = redis::pipe();
    pipe.cmd("ZADD")
        .arg(&conns)
        .arg(expires)
        .arg(key)
        .ignore()
        .cmd("ZREMRANGEBYSCORE")
        .arg(&conns)
        .arg("-inf")
        .arg((cfg.clock)())
        .ignore();
    if !cfg.has(Bug::NoLeaseExpiry) {
        pipe.cmd("PEXPIRE")
            .arg(&conns)
            .arg(ttl.as_millis() as u64 * 2)
            .ignore();
    }
    shared.redis.query_pipe::<()>(&pipe).await
}

/// A lease score in the year 2100: [`Bug::NoLeaseExpiry`]'s "forever".
const NEVER_MS: u64 = 4_102_444_800_000;

/// Ends a connection's presence: exactly its own lease and local entry.
pub(crate) async fn logout(shared: &Shared, node: &Node, conn_id: ConnId, attached: Attached) {
    attached.pump.abort();
    let last_here = {
        let mut conns = node.lock();
        conns.by_id.remove(&conn_id);
        let mine = conns.by_user.entry(attached.user).or_default();
        mine.remove(&conn_id);
        let empty = mine.is_empty();
        if empty {
            conns.by_user.remove(&attached.user);
        }
        empty
    };
    let cfg = &shared.config;
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
    let zrem = redis::cmd("ZREM")
        .arg(cfg.user_key(attached.user, "conns"))
        .arg(&attached.key)
        .clone();
    let removed = if cfg.has(Bug::Phase1Cleanup) {
        Ok(0)
    } else {
        shared.redis.query::<i64>(&zrem).await
    };
    match removed {
        Ok(_) => tracing::info!(key = attached.key, "lease removed"),
        Err(e) => {
            tracing::warn!(key = attached.key, error = %e, "lease not removed; it expires by itself")
        }
    }
    if last_here
        && let Err(e) = shared
            .redis
            .unsubscribe(&cfg.user_key(attached.user, "bell"))
            .await
    {
        tracing::debug!(error = %e, "unsubscribe failed");
    }
}

/// Stores a message in the recipient's inbox; returns its sequence number.
/// A retry of an already stored (sender, client_msg_id) returns the
/// original sequence without storing it again.
///
/// One round trip: [`inbox::STORE_SCRIPT`] (dedup, number, insert, trim,
/// dedup record, atomically) and the doorbell for other nodes pipelined
/// behind it. The doorbell is not inside the script: this node may itself
/// be subscribed to the bell on the same connection, and a RESP3 push in
/// the middle of a transaction's reply misaligned redis-rs's pipeline
/// replies (found live by `im-client bench`); after a whole reply it is
/// handled like any push. It names its origin so this node does not wake
/// its own pumps twice.
pub(crate) async fn store(
    shared: &Shared,
    node: &Node,
    from: UserId,
    send: &pb::Send,
) -> Result<u64, RedisError> {
    let cfg = &shared.config;
    let to = UserId(send.to_user_id);
    // Stored with seq 0: the number is only known inside Redis.
    let mut deliver = pb::Deliver {
        from_user_id: from.0,
        text: send.text.clone(),
        client_msg_id: send.client_msg_id,
        seq: 0,
    };
    let envelope = inbox::frame(deliver.clone());
    let (fresh, seq) = if cfg.has(Bug::SeqTakenBeforeStore) {
        store_in_two_steps(shared, node, to, from, send.client_msg_id, &envelope).await?
    } else {
        store_atomically(shared, node, to, from, send.client_msg_id, &envelope).await?
    };
    if !fresh {
        tracing::info!(
            to = to.0,
            seq,
            "duplicate send; answering with the stored sequence"
        );
        return Ok(seq);
    }
    if cfg.has(Bug::SeqTakenBeforeStore) {
        // The historical store as it was: pumps read the inbox.
        ring_local(node, to);
    } else {
        deliver.seq = seq;
        let frame = bytes::Bytes::from(inbox::frame(deliver));
        hand_local(node, to, seq, &frame);
    }
    Ok(seq)
}

fn dedup_key(cfg: &Config, to: UserId, from: UserId, client_msg_id: u64) -> String {
    cfg.user_key(to, &format!("dedup:{}:{client_msg_id}", from.0))
}

/// The doorbell for `to`'s pumps on other nodes, appended to `pipe`.
fn ring_others(pipe: &mut redis::Pipeline, cfg: &Config, node: &Node, to: UserId) {
    if !cfg.has(Bug::NoDoorbells) {
        pipe.cmd("PUBLISH")
            .arg(cfg.user_key(to, "bell"))
            .arg(format!("stored {}", node.origin(cfg)))
            .ignore();
    }
}

/// The store script's hash, for EVALSHA.
static STORE_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(inbox::STORE_SCRIPT));

async fn store_atomically(
    shared: &Shared,
    node: &Node,
    to: UserId,
    from: UserId,
    client_msg_id: u64,
    envelope: &[u8],
) -> Result<(bool, u64), RedisError> {
    let cfg = &shared.config;
    let h = cfg.hardened;
    let call = |by_source: bool| {
        let mut pipe = redis::pipe();
        let cmd = if by_source {
            pipe.cmd("EVAL").arg(inbox::STORE_SCRIPT)
        } else {
            pipe.cmd("EVALSHA").arg(STORE_SCRIPT.get_hash())
        };
        cmd.arg(3)
            .arg(cfg.user_key(to, "seq"))
            .arg(cfg.user_key(to, "inbox"))
            .arg(dedup_key(cfg, to, from, client_msg_id))
            .arg(seq_start_value(shared))
            .arg(envelope)
            .arg(-1 - h.inbox_len_max as i64)
            .arg(h.dedup_ttl.as_millis() as u64)
            .arg(if cfg.has(Bug::NoDedup) { "0" } else { "1" });
        ring_others(&mut pipe, cfg, node, to);
        pipe
    };
    let ((stored, seq),): ((u8, u64),) = match shared.redis.query_pipe(&call(false)).await {
        Err(RedisError::Command(e))
            if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
        {
            // A restarted Redis has an empty script cache; EVAL loads it.
            shared.redis.query_pipe(&call(true)).await?
        }
        other => other?,
    };
    Ok((stored == 1, seq))
}

/// The `seq_taken_before_store` bug: a number from INCR in one round trip,
/// the insert in the next, so concurrent stores for one user can land out
/// of sequence order.
async fn store_in_two_steps(
    shared: &Shared,
    node: &Node,
    to: UserId,
    from: UserId,
    client_msg_id: u64,
    envelope: &[u8],
) -> Result<(bool, u64), RedisError> {
    let cfg = &shared.config;
    let h = cfg.hardened;
    let dedup = dedup_key(cfg, to, from, client_msg_id);
    let (stored, seq): (Option<u64>, u64) = shared
        .redis
        .query_pipe(
            &seq_start(shared, to)
                .cmd("GET")
                .arg(&dedup)
                .cmd("INCR")
                .arg(cfg.user_key(to, "seq"))
                .clone(),
        )
        .await?;
    if let Some(seq) = stored
        && !cfg.has(Bug::NoDedup)
    {
        return Ok((false, seq));
    }
    let inbox = cfg.user_key(to, "inbox");
    let mut pipe = redis::pipe();
    pipe.atomic()
        .cmd("ZADD")
        .arg(&inbox)
        .arg(seq)
        .arg(inbox::member(seq, envelope))
        .ignore()
        .cmd("ZREMRANGEBYRANK")
        .arg(&inbox)
        .arg(0)
        .arg(-1 - h.inbox_len_max as i64)
        .ignore()
        .cmd("SET")
        .arg(&dedup)
        .arg(seq)
        .arg("PX")
        .arg(h.dedup_ttl.as_millis() as u64)
        .ignore();
    shared.redis.query_pipe::<()>(&pipe).await?;
    let mut bell = redis::pipe();
    ring_others(&mut bell, cfg, node, to);
    if let Err(e) = shared.redis.query_pipe::<()>(&bell).await {
        tracing::warn!(error = %e, "doorbell not published; other nodes poll");
    }
    Ok((true, seq))
}

/// Sequence numbers start from the clock (unix ms × 1000) when a user's
/// counter is first created, so after Redis loses its data new numbers are
/// still above every number handed out before: a device's resume point
/// never lands in the future, and no message hides below a stale cursor.
/// Returns a pipeline that sets the start if absent (its reply ignored).
fn seq_start(shared: &Shared, user: UserId) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.cmd("SET")
        .arg(shared.config.user_key(user, "seq"))
        .arg(seq_start_value(shared))
        .arg("NX")
        .ignore();
    pipe
}

fn seq_start_value(shared: &Shared) -> u64 {
    if shared.config.has(Bug::SeqRestartsFromZero) {
        0
    } else {
        (shared.config.clock)().saturating_mul(1000)
    }
}

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

/// Pushes a connection everything in its user's inbox after its cursor,
/// whenever woken, and at least every heartbeat interval. A message stored
/// on this node comes with its frame ([`Wake::hand`]) and goes out without
/// a Redis read when it continues the cursor; anything else (a gap, a
/// doorbell, the poll) reads the inbox after the cursor.
async fn pump(
    shared: Arc<Shared>,
    user: UserId,
    handle: ConnHandle,
    wake: Arc<Wake>,
    pushed: Arc<AtomicU64>,
) {
    let cfg = &shared.config;
    let inbox = cfg.user_key(user, "inbox");
    let page = cfg.hardened.inbox_page_len;
    // The backlog after the device's resume point.
    let mut read = true;
    loop {
        loop {
            let Some((seq, frame)) = wake.handed().pop_front() else {
                break;
            };
            let cursor = pushed.load(Ordering::Relaxed);
            if seq <= cursor {
                continue; // a read got it first
            }
            if seq != cursor + 1 {
                // Something between is in Redis (stored elsewhere, or its
                // hand-off is still on the way): read it, and these too.
                wake.handed().clear();
                read = true;
                break;
            }
            if !push(&handle, &pushed, seq, frame).await {
                return;
            }
        }
        if read || wake.read.swap(false, Ordering::Relaxed) {
            read = false;
            let cursor = pushed.load(Ordering::Relaxed);
            // The command lives only for its query: anything in scope at
            // the wait below is kept in every idle pump's future.
            let members = {
                let cmd = redis::cmd("ZRANGEBYSCORE")
                    .arg(&inbox)
                    .arg(format!("({cursor}"))
                    .arg("+inf")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(page)
                    .clone();
                shared.redis.query::<Vec<Vec<u8>>>(&cmd).await
            };
            match members {
                Ok(members) => {
                    let full = members.len() == page;
                    for member in members {
                        let deliver = match inbox::entry(&member) {
                            Ok(d) => d,
                            Err(e) => {
                                tracing::error!(error = %e, "corrupt inbox entry; skipping it");
                                continue;
                            }
                        };
                        let seq = deliver.seq;
                        if !push(&handle, &pushed, seq, inbox::frame(deliver).into()).await {
                            return;
                        }
                    }
                    if full {
                        read = true;
                        continue;
                    }
                }
                Err(e) => tracing::debug!(error = %e, "inbox read failed; retrying later"),
            }
        }
        tokio::select! {
            _ = wake.notify.notified() => {}
            _ = tokio::time::sleep(cfg.hardened.heartbeat_interval) => read = true,
        }
    }
}

/// Queues one Deliver frame for the pump's connection; false when the pump
/// must end (the connection is closing, or too slow and now closed).
async fn push(handle: &ConnHandle, pushed: &AtomicU64, seq: u64, frame: bytes::Bytes) -> bool {
    // Raised before the frame is queued: on a multi-threaded runtime the
    // client may ack it before the pump runs again, and the ack check must
    // already know the seq.
    let before = pushed.fetch_max(seq, Ordering::Relaxed);
    // A backlog (a device back from a long absence) may be larger than the
    // outbound queue: wait for room, and call it a slow consumer only when
    // none comes. Boxed: only alive while queueing (an idle pump's future
    // stays small).
    match Box::pin(handle.write_when_room(Message::Binary(frame))).await {
        Ok(()) => true,
        Err(WriteError::QueueFull) => {
            tracing::warn!("slow consumer: outbound queue full for the write timeout; closing");
            handle.close(close(close_code::SLOW_CONSUMER, "slow consumer"));
            false
        }
        Err(_) => {
            pushed.store(before, Ordering::Relaxed);
            false
        }
    }
}

/// Handles doorbells from other nodes and resubscribes after Redis comes
/// back. Runs for the node's life.
pub(crate) async fn doorbells(shared: Arc<Shared>, node: Arc<Node>) {
    let Some(mut pushes) = node.pushes.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return;
    };
    let mut generations: watch::Receiver<u64> = shared.redis.generations();
    generations.mark_unchanged();
    loop {
        tokio::select! {
            biased;
            changed = generations.changed() => {
                if changed.is_err() {
                    return;
                }
                resubscribe(&shared, &node).await;
            }
            push = pushes.recv() => match push {
                Some(push) => on_push(&shared, &node, push),
                None => return,
            },
        }
    }
}

/// After a redial: subscriptions are gone and doorbells may have been
/// missed, so subscribe again and wake every pump. Leases are not written
/// here: each is rewritten by its own session within one heartbeat
/// interval, and only its session may write it (a refresh from here could
/// race the session's final ZREM and resurrect a removed lease).
async fn resubscribe(shared: &Shared, node: &Node) {
    let users: Vec<UserId> = node.lock().by_user.keys().copied().collect();
    tracing::info!(users = users.len(), "redis reconnected: resubscribing");
    for user in &users {
        if let Err(e) = shared
            .redis
            .subscribe(&shared.config.user_key(*user, "bell"))
            .await
        {
            tracing::warn!(error = %e, "resubscribe failed");
        }
    }
    for user in users {
        ring_local(node, user);
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
            let Some((device, newer)) = rest.split_once(' ') else {
                return;
            };
            let conns = node.lock();
            for id in conns.by_user.get(&user).into_iter().flatten() {
                if let Some(e) = conns.by_id.get(id)
                    && e.device == device
                    && e.key != newer
                    && !shared.config.has(Bug::NoSupersede)
                {
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
