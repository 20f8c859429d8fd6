//! The server's one Redis connection, built over a [`Connector`] so the
//! simulation can hand it a turmoil stream.
//!
//! `redis::Client` and `ConnectionManager` always open real sockets, so the
//! link builds a `MultiplexedConnection` itself (`new_with_config`, with
//! `skip_set_lib_name` so no crate version leaks into logs or snapshots)
//! and reconnects by itself: a command that fails with a connection error
//! drops the connection, and the next command dials again, no sooner than
//! a backoff that doubles from 50 ms to 250 ms while Redis stays away (a
//! dial to a Redis that is down costs one SYN; a longer cap would only
//! delay recovery once it is back).
//!
//! Every connection has a generation (bumped by each successful dial). A
//! failed command discards only the connection it ran on: a command that
//! times out on a connection already replaced must not throw away the
//! newer one (it did, and a node redialed three times in 25 ms, losing its
//! subscriptions each time). With pushes on ([`RedisLink::with_pushes`]),
//! redis-rs's notice that a connection closed arrives as a [`Push`] of kind
//! `Disconnection` with that connection's generation; whoever reads the
//! pushes calls [`RedisLink::lost`] and [`RedisLink::connect_now`], so a
//! node that issues no command still notices at once and redials.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, FromRedisValue, RedisConnectionInfo};
use tokio::sync::{Mutex, mpsc, watch};
use tokio::time::Instant;

use crate::listener::Connector;

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_millis(250);

/// Why a Redis command did not answer.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis unreachable (next dial in {retry_in:?})")]
    Backoff { retry_in: Duration },
    #[error("redis connect failed: {0}")]
    Connect(std::io::Error),
    #[error("redis connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("redis: {0}")]
    Command(#[from] redis::RedisError),
}

struct State {
    conn: Option<(MultiplexedConnection, u64)>,
    next_dial: Option<Instant>,
    backoff: Duration,
}

/// A RESP3 push (a pub/sub message, or redis-rs's `Disconnection` notice)
/// from the connection of generation `generation`.
#[derive(Debug)]
pub struct Push {
    pub generation: u64,
    pub info: redis::PushInfo,
}

/// Forwards one connection's pushes into a bounded queue. A full queue
/// drops a pub/sub message (they are doorbells, and whoever reads them
/// polls the stored truth anyway) but never a disconnection notice: that
/// one waits on a task of its own until there is room.
struct BoundedPushes {
    tx: mpsc::Sender<Push>,
    generation: u64,
}

impl redis::aio::AsyncPushSender for BoundedPushes {
    fn send(&self, info: redis::PushInfo) -> Result<(), redis::aio::SendError> {
        let disconnection = info.kind == redis::PushKind::Disconnection;
        let push = Push {
            generation: self.generation,
            info,
        };
        match self.tx.try_send(push) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(push)) if disconnection => {
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(push).await;
                });
            }
            Err(_) => tracing::debug!("push queue full; dropping a doorbell"),
        }
        Ok(())
    }
}

/// A self-healing Redis connection.
pub struct RedisLink {
    connector: Connector,
    info: RedisConnectionInfo,
    timeout: Duration,
    state: Mutex<State>,
    pushes: Option<mpsc::Sender<Push>>,
    /// The generation of the latest successful dial, so subscribers know to
    /// resubscribe.
    generation: watch::Sender<u64>,
    /// The historical behaviour (the `slow_redis_recovery` bug switch): a
    /// failed command discards whatever connection is current.
    discard_any: bool,
}

impl RedisLink {
    /// `info` carries db/password; the lib-name handshake is always skipped.
    pub fn new(connector: Connector, info: RedisConnectionInfo, timeout: Duration) -> RedisLink {
        RedisLink {
            connector,
            info: info.set_skip_set_lib_name(),
            timeout,
            state: Mutex::new(State {
                conn: None,
                next_dial: None,
                backoff: BACKOFF_MIN,
            }),
            pushes: None,
            generation: watch::Sender::new(0),
            discard_any: false,
        }
    }

    /// Speaks RESP3 and forwards pushes into a queue of `capacity`.
    /// Subscriptions die with a connection: watch [`Self::generations`]
    /// and subscribe again after each redial.
    pub fn with_pushes(mut self, capacity: usize) -> (RedisLink, mpsc::Receiver<Push>) {
        let (tx, rx) = mpsc::channel(capacity);
        self.info = self.info.set_protocol(redis::ProtocolVersion::RESP3);
        self.pushes = Some(tx);
        (self, rx)
    }

    /// Switches back on the historical behaviour where a failed command on
    /// an old connection also discards its replacement (a bug switch).
    pub(crate) fn discarding_any_connection(mut self, on: bool) -> RedisLink {
        self.discard_any = on;
        self
    }

    /// Changes after every (re)connection to Redis.
    pub fn generations(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// `SUBSCRIBE channel...` on the current connection (RESP3 only).
    pub async fn subscribe(&self, channels: &[String]) -> Result<(), RedisError> {
        Box::pin(async {
            let (mut conn, generation) = self.connection().await?;
            let r = conn.subscribe(channels).await;
            self.on_reply(generation, r).await
        })
        .await
    }

    /// `UNSUBSCRIBE channel...` on the current connection.
    pub async fn unsubscribe(&self, channels: &[String]) -> Result<(), RedisError> {
        Box::pin(async {
            let (mut conn, generation) = self.connection().await?;
            let r = conn.unsubscribe(channels).await;
            self.on_reply(generation, r).await
        })
        .await
    }

    /// The connection of `generation` is gone (redis-rs said so): forget it
    /// unless it was already replaced.
    pub async fn lost(&self, generation: u64) {
        let mut state = self.state.lock().await;
        if state.conn.as_ref().is_some_and(|(_, g)| *g == generation) {
            tracing::info!(generation, "redis connection lost");
            state.conn = None;
        }
    }

    /// Dials now unless connected (within the backoff); the generation
    /// watch fires on success.
    pub async fn connect_now(&self) -> Result<(), RedisError> {
        self.connection().await.map(drop)
    }

    async fn connection(&self) -> Result<(MultiplexedConnection, u64), RedisError> {
        let mut state = self.state.lock().await;
        if let Some((conn, generation)) = &state.conn {
            return Ok((conn.clone(), *generation));
        }
        let now = Instant::now();
        if let Some(at) = state.next_dial
            && now < at
        {
            return Err(RedisError::Backoff { retry_in: at - now });
        }
        let generation = *self.generation.borrow() + 1;
        match self.dial(generation).await {
            Ok(conn) => {
                tracing::info!(generation, "redis connected");
                state.conn = Some((conn.clone(), generation));
                state.next_dial = None;
                state.backoff = BACKOFF_MIN;
                self.generation.send_replace(generation);
                Ok((conn, generation))
            }
            Err(e) => {
                state.next_dial = Some(Instant::now() + state.backoff);
                state.backoff = (state.backoff * 2).min(BACKOFF_MAX);
                tracing::warn!(error = %e, "redis dial failed");
                Err(e)
            }
        }
    }

    async fn dial(&self, generation: u64) -> Result<MultiplexedConnection, RedisError> {
        let stream = tokio::time::timeout(self.timeout, (self.connector)())
            .await
            .map_err(|_| RedisError::ConnectTimeout(self.timeout))?
            .map_err(RedisError::Connect)?;
        let mut config = AsyncConnectionConfig::new().set_response_timeout(Some(self.timeout));
        if let Some(tx) = &self.pushes {
            config = config.set_push_sender(BoundedPushes {
                tx: tx.clone(),
                generation,
            });
        }
        let handshake = MultiplexedConnection::new_with_config(&self.info, stream, config);
        let (conn, driver) = tokio::time::timeout(self.timeout, handshake)
            .await
            .map_err(|_| RedisError::ConnectTimeout(self.timeout))??;
        tokio::spawn(driver);
        Ok(conn)
    }

    /// Runs one command and decodes its reply. A connection error or
    /// timeout drops the connection it ran on, so the next call redials.
    ///
    /// Boxed (here and in [`Self::query_pipe`]): redis-rs's futures are
    /// large, and inline they would size every long-lived task that ever
    /// awaits one (a connection's pump, its session).
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, RedisError> {
        Box::pin(async {
            let (mut conn, generation) = self.connection().await?;
            let reply = cmd.query_async(&mut conn).await;
            self.on_reply(generation, reply).await
        })
        .await
    }

    /// Runs a pipeline (atomic when built with `.atomic()`), as [`Self::query`].
    pub async fn query_pipe<T: FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, RedisError> {
        Box::pin(async {
            let (mut conn, generation) = self.connection().await?;
            let reply = pipe.query_async(&mut conn).await;
            self.on_reply(generation, reply).await
        })
        .await
    }

    async fn on_reply<T>(
        &self,
        generation: u64,
        reply: redis::RedisResult<T>,
    ) -> Result<T, RedisError> {
        if let Err(e) = &reply
            && (e.is_io_error()
                || e.is_timeout()
                || e.is_connection_dropped()
                || e.is_unrecoverable_error())
        {
            let mut state = self.state.lock().await;
            let current = state.conn.as_ref().is_some_and(|(_, g)| *g == generation);
            if current || self.discard_any {
                state.conn = None;
            }
        }
        Ok(reply?)
    }
}
