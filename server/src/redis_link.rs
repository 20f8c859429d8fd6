//! The server's one Redis connection, built over a [`Connector`] so the
//! simulation can hand it a turmoil stream.
//!
//! `redis::Client` and `ConnectionManager` always open real sockets, so the
//! link builds a `MultiplexedConnection` itself (`new_with_config`, with
//! `skip_set_lib_name` so no crate version leaks into logs or snapshots)
//! and reconnects by itself: a command that fails with a connection error
//! drops the connection, and the next command dials again, no sooner than
//! a backoff that doubles from 50 ms to 2 s while Redis stays away.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, FromRedisValue, RedisConnectionInfo};
use tokio::sync::{Mutex, mpsc, watch};
use tokio::time::Instant;

use crate::listener::Connector;

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

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
    conn: Option<MultiplexedConnection>,
    next_dial: Option<Instant>,
    backoff: Duration,
}

/// Forwards RESP3 pushes (pub/sub messages) into a bounded queue. A full
/// queue drops the push: they are doorbells, and whoever reads them polls
/// the stored truth anyway.
struct BoundedPushes(mpsc::Sender<redis::PushInfo>);

impl redis::aio::AsyncPushSender for BoundedPushes {
    fn send(&self, info: redis::PushInfo) -> Result<(), redis::aio::SendError> {
        if self.0.try_send(info).is_err() {
            tracing::debug!("push queue full; dropping a doorbell");
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
    pushes: Option<mpsc::Sender<redis::PushInfo>>,
    /// Bumped on every successful dial, so subscribers know to resubscribe.
    generation: watch::Sender<u64>,
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
        }
    }

    /// Speaks RESP3 and forwards pub/sub pushes into a queue of `capacity`.
    /// Subscriptions die with a connection: watch [`Self::generations`]
    /// and subscribe again after each redial.
    pub fn with_pushes(mut self, capacity: usize) -> (RedisLink, mpsc::Receiver<redis::PushInfo>) {
        let (tx, rx) = mpsc::channel(capacity);
        self.info = self.info.set_protocol(redis::ProtocolVersion::RESP3);
        self.pushes = Some(tx);
        (self, rx)
    }

    /// Changes after every (re)connection to Redis.
    pub fn generations(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// `SUBSCRIBE channel` on the current connection (RESP3 only).
    pub async fn subscribe(&self, channel: &str) -> Result<(), RedisError> {
        let mut conn = self.connection().await?;
        let r = conn.subscribe(channel).await;
        self.on_reply(r).await
    }

    /// `UNSUBSCRIBE channel` on the current connection.
    pub async fn unsubscribe(&self, channel: &str) -> Result<(), RedisError> {
        let mut conn = self.connection().await?;
        let r = conn.unsubscribe(channel).await;
        self.on_reply(r).await
    }

    async fn connection(&self) -> Result<MultiplexedConnection, RedisError> {
        let mut state = self.state.lock().await;
        if let Some(conn) = &state.conn {
            return Ok(conn.clone());
        }
        let now = Instant::now();
        if let Some(at) = state.next_dial
            && now < at
        {
            return Err(RedisError::Backoff { retry_in: at - now });
        }
        match self.dial().await {
            Ok(conn) => {
                tracing::info!("redis connected");
                state.conn = Some(conn.clone());
                state.next_dial = None;
                state.backoff = BACKOFF_MIN;
                self.generation.send_modify(|g| *g += 1);
                Ok(conn)
            }
            Err(e) => {
                state.next_dial = Some(Instant::now() + state.backoff);
                state.backoff = (state.backoff * 2).min(BACKOFF_MAX);
                tracing::warn!(error = %e, "redis dial failed");
                Err(e)
            }
        }
    }

    async fn dial(&self) -> Result<MultiplexedConnection, RedisError> {
        let stream = tokio::time::timeout(self.timeout, (self.connector)())
            .await
            .map_err(|_| RedisError::ConnectTimeout(self.timeout))?
            .map_err(RedisError::Connect)?;
        let mut config = AsyncConnectionConfig::new().set_response_timeout(Some(self.timeout));
        if let Some(tx) = &self.pushes {
            config = config.set_push_sender(BoundedPushes(tx.clone()));
        }
        let handshake = MultiplexedConnection::new_with_config(&self.info, stream, config);
        let (conn, driver) = tokio::time::timeout(self.timeout, handshake)
            .await
            .map_err(|_| RedisError::ConnectTimeout(self.timeout))??;
        tokio::spawn(driver);
        Ok(conn)
    }

    /// Runs one command and decodes its reply. A connection error or
    /// timeout drops the connection so the next call redials.
    ///
    /// Boxed (here and in [`Self::query_pipe`]): redis-rs's futures are
    /// large, and inline they would size every long-lived task that ever
    /// awaits one (a connection's pump, its session).
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, RedisError> {
        Box::pin(async {
            let mut conn = self.connection().await?;
            let reply = cmd.query_async(&mut conn).await;
            self.on_reply(reply).await
        })
        .await
    }

    /// Runs a pipeline (atomic when built with `.atomic()`), as [`Self::query`].
    pub async fn query_pipe<T: FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, RedisError> {
        Box::pin(async {
            let mut conn = self.connection().await?;
            let reply = pipe.query_async(&mut conn).await;
            self.on_reply(reply).await
        })
        .await
    }

    async fn on_reply<T>(&self, reply: redis::RedisResult<T>) -> Result<T, RedisError> {
        if let Err(e) = &reply
            && (e.is_io_error()
                || e.is_timeout()
                || e.is_connection_dropped()
                || e.is_unrecoverable_error())
        {
            self.state.lock().await.conn = None;
        }
        Ok(reply?)
    }
}
