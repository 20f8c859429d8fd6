//! Storing a message: what "sent" means in the hardened profile.
//!
//! A send is answered "accepted" only once [`crate::scripts::STORE`] put it
//! in the recipient's inbox at a sequence number. The script refuses, and
//! the sender hears why (never "sent"): a reused client message id for a
//! different message, a recipient who has not logged in within the
//! retention time, and a recipient whose devices have not acknowledged
//! `inbox_backlog_max` messages (retry later). A true retry (same sender,
//! device, recipient, id and text) is answered with the first answer's
//! sequence and stored once.

use std::sync::LazyLock;

use im_proto::UserId;
use im_proto::pb;
use redis::FromRedisValue;
use sha2::{Digest as _, Sha256};

use crate::Shared;
use crate::config::{Bug, Config};
use crate::inbox;
use crate::redis_link::RedisError;

use super::{Node, hand_local, retention_ms, ring_local};

/// Why a send was not stored.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refused {
    #[error("client_msg_id {id} was already used for another message (stored at {seq})")]
    IdReused { id: u64, seq: u64 },
    #[error("unknown recipient {0}: not a user who logged in within the retention time")]
    UnknownRecipient(UserId),
    #[error(
        "recipient {0}'s inbox is full: too many messages no device of theirs has acknowledged"
    )]
    InboxFull(UserId),
    #[error("unavailable, retry: {0}")]
    Unavailable(#[from] RedisError),
}

/// A script call (EVALSHA, or EVAL when Redis lost its script cache) with
/// its keys and arguments.
pub(crate) struct Eval<'a> {
    script: &'a redis::Script,
    source: &'static str,
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
}

impl<'a> Eval<'a> {
    pub(crate) fn new(script: &'a redis::Script, source: &'static str) -> Eval<'a> {
        Eval {
            script,
            source,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }

    pub(crate) fn key(mut self, key: String) -> Self {
        self.keys.push(key);
        self
    }

    pub(crate) fn arg(mut self, arg: impl ToString) -> Self {
        self.args.push(arg.to_string().into_bytes());
        self
    }

    pub(crate) fn arg_bytes(mut self, arg: &[u8]) -> Self {
        self.args.push(arg.to_vec());
        self
    }

    fn pipeline(&self, by_source: bool, tail: &impl Fn(&mut redis::Pipeline)) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        self.add_to(&mut pipe, by_source);
        tail(&mut pipe);
        pipe
    }

    /// Appends the call to `pipe` (its reply not ignored).
    pub(crate) fn add_to(&self, pipe: &mut redis::Pipeline, by_source: bool) {
        let cmd = if by_source {
            pipe.cmd("EVAL").arg(self.source)
        } else {
            pipe.cmd("EVALSHA").arg(self.script.get_hash())
        };
        cmd.arg(self.keys.len());
        for k in &self.keys {
            cmd.arg(k);
        }
        for a in &self.args {
            cmd.arg(&a[..]);
        }
    }

    /// Runs a pipeline that `build` makes, calling `call` where the script
    /// goes; on NOSCRIPT (a restarted Redis) it runs again with EVAL, so
    /// the commands around the script must bear running twice. Returns the
    /// whole pipeline's replies.
    pub(crate) async fn run_in<T: FromRedisValue>(
        &self,
        shared: &Shared,
        build: impl Fn(&mut redis::Pipeline, &dyn Fn(&mut redis::Pipeline)),
    ) -> Result<T, RedisError> {
        let make = |by_source: bool| {
            let mut pipe = redis::pipe();
            build(&mut pipe, &|p: &mut redis::Pipeline| {
                self.add_to(p, by_source)
            });
            pipe
        };
        match shared.redis.query_pipe(&make(false)).await {
            Err(RedisError::Command(e))
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                shared.redis.query_pipe(&make(true)).await
            }
            other => other,
        }
    }

    /// Runs the script with `tail` (commands whose replies are ignored)
    /// pipelined behind it, in one round trip; returns the script's reply.
    pub(crate) async fn run<T: FromRedisValue>(
        &self,
        shared: &Shared,
        tail: impl Fn(&mut redis::Pipeline),
    ) -> Result<T, RedisError> {
        match shared.redis.query_pipe(&self.pipeline(false, &tail)).await {
            Err(RedisError::Command(e))
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                // A restarted Redis has an empty script cache; EVAL loads it.
                shared.redis.query_pipe(&self.pipeline(true, &tail)).await
            }
            other => other,
        }
    }
}

static STORE_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(crate::scripts::STORE));

/// What makes a retry a retry: the sending device and the text (the key
/// already names the recipient, the sender and the id). 16 bytes of
/// SHA-256, hex.
fn digest(device: &str, text: &str) -> String {
    let mut h = Sha256::new();
    h.update(device.as_bytes());
    h.update([0]);
    h.update(text.as_bytes());
    hex::encode(&h.finalize()[..16])
}

/// Stores a message in the recipient's inbox; returns its sequence number
/// (the first one's, for a retry).
///
/// One round trip: the store script and the doorbell for other nodes
/// pipelined behind it. The doorbell is not inside the script: this node
/// may itself be subscribed to the bell on the same connection, and a RESP3
/// push in the middle of a transaction's reply misaligned redis-rs's
/// pipeline replies (found live by `im-client bench`); after a whole reply
/// it is handled like any push. It names its origin so this node does not
/// wake its own pumps twice.
pub(crate) async fn store(
    shared: &Shared,
    node: &Node,
    from: UserId,
    device: &str,
    send: &pb::Send,
) -> Result<u64, Refused> {
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
    if cfg.has(Bug::SeqTakenBeforeStore) {
        let seq = store_in_two_steps(shared, node, to, from, send.client_msg_id, &envelope).await?;
        return Ok(seq);
    }
    let h = cfg.hardened;
    let k = super::Keys::of(cfg, to);
    let (trim, backlog) = if cfg.has(Bug::InboxTrimsUndelivered) {
        ("window", 0)
    } else {
        ("acked", h.inbox_backlog_max)
    };
    let dedup = if cfg.has(Bug::NoDedup) {
        "off"
    } else if cfg.has(Bug::DedupByIdOnly) {
        "id"
    } else {
        "digest"
    };
    let known = if cfg.has(Bug::UnknownRecipientsStored) {
        "0"
    } else {
        "1"
    };
    let script = Eval::new(&STORE_SCRIPT, crate::scripts::STORE)
        .key(k.seq)
        .key(k.inbox)
        .key(dedup_key(cfg, to, from, send.client_msg_id))
        .key(k.user)
        .arg(seq_start_value(shared))
        .arg_bytes(&envelope)
        .arg(h.inbox_history_max)
        .arg(backlog)
        .arg(h.dedup_ttl.as_millis())
        .arg(dedup)
        .arg(digest(device, &send.text))
        .arg(retention_ms(cfg))
        .arg(known)
        .arg(trim);
    let bell = k.bell;
    let origin = node.origin(cfg);
    let ((status, seq),): ((u8, u64),) = script
        .run(shared, |pipe| {
            if !cfg.has(Bug::NoDoorbells) {
                pipe.cmd("PUBLISH")
                    .arg(&bell)
                    .arg(format!("stored {origin}"))
                    .ignore();
            }
        })
        .await?;
    crate::metrics::store(status);
    match status {
        1 => {
            crate::metrics::stored_bytes(envelope.len());
            deliver.seq = seq;
            let frame = bytes::Bytes::from(inbox::frame(deliver));
            hand_local(node, to, seq, &frame);
            Ok(seq)
        }
        0 => {
            tracing::info!(
                to = to.0,
                seq,
                "duplicate send; answering with the stored sequence"
            );
            Ok(seq)
        }
        2 => Err(Refused::IdReused {
            id: send.client_msg_id,
            seq,
        }),
        3 => Err(Refused::UnknownRecipient(to)),
        _ => Err(Refused::InboxFull(to)),
    }
}

fn dedup_key(cfg: &Config, to: UserId, from: UserId, client_msg_id: u64) -> String {
    cfg.user_key(to, &format!("dedup:{}:{client_msg_id}", from.0))
}

/// The `seq_taken_before_store` bug: a number from INCR in one round trip,
/// the insert in the next, so concurrent stores for one user can land out
/// of sequence order. (The historical store: no backlog limit, a window
/// trim, dedup by id. It refuses unknown recipients as today's store does,
/// so this switch brings back the ordering bug alone.)
async fn store_in_two_steps(
    shared: &Shared,
    node: &Node,
    to: UserId,
    from: UserId,
    client_msg_id: u64,
    envelope: &[u8],
) -> Result<u64, Refused> {
    let cfg = &shared.config;
    let h = cfg.hardened;
    let dedup = dedup_key(cfg, to, from, client_msg_id);
    let seq_key = cfg.user_key(to, "seq");
    let mut exists = redis::cmd("EXISTS");
    exists.arg(cfg.user_key(to, "user"));
    let known: bool = shared.redis.query(&exists).await?;
    if !known && !cfg.has(Bug::UnknownRecipientsStored) {
        return Err(Refused::UnknownRecipient(to));
    }
    let (stored, seq): (Option<String>, u64) = shared
        .redis
        .query_pipe(
            redis::pipe()
                .cmd("SET")
                .arg(&seq_key)
                .arg(seq_start_value(shared))
                .arg("NX")
                .ignore()
                .cmd("GET")
                .arg(&dedup)
                .cmd("INCR")
                .arg(&seq_key),
        )
        .await?;
    if let Some(seq) = stored
        .as_deref()
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        && !cfg.has(Bug::NoDedup)
    {
        return Ok(seq);
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
        .arg(-1 - h.inbox_history_max as i64)
        .ignore()
        .cmd("SET")
        .arg(&dedup)
        .arg(seq)
        .arg("PX")
        .arg(h.dedup_ttl.as_millis() as u64)
        .ignore();
    shared.redis.query_pipe::<()>(&pipe).await?;
    if !cfg.has(Bug::NoDoorbells) {
        let bell = redis::cmd("PUBLISH")
            .arg(cfg.user_key(to, "bell"))
            .arg(format!("stored {}", node.origin(cfg)))
            .clone();
        if let Err(e) = shared.redis.query::<i64>(&bell).await {
            tracing::warn!(error = %e, "doorbell not published; other nodes poll");
        }
    }
    // The historical store as it was: pumps read the inbox.
    ring_local(node, to);
    Ok(seq)
}

/// Sequence numbers (and device generations) start from the clock (unix
/// ms × 1000) when a user's counter is first created, so after Redis loses
/// its data new numbers are still above every number handed out before: a
/// device's resume point never lands in the future, no message hides below
/// a stale cursor, and a new connection outranks an old one.
pub(crate) fn seq_start_value(shared: &Shared) -> u64 {
    if shared.config.has(Bug::SeqRestartsFromZero) {
        0
    } else {
        (shared.config.clock)().saturating_mul(1000)
    }
}
