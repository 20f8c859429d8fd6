//! imsim's IM WebSocket server.
//!
//! Data flows: a [`Listener`] yields streams → [`session`] does the
//! WebSocket handshake, login and read loop for each, with one writer task
//! per connection → a Send becomes a push ([`Shared::push`]): presence is
//! checked in Redis ([`presence`], through [`redis_link`]), the recipient
//! is looked up in the local [`registry`], and the frame is queued to the
//! recipient's writer. When a connection ends, the profile's cleanup runs.
//!
//! Modules:
//! - [`config`]: `Profile` → `Switches` (the one place phases differ), `Limits`.
//! - [`listener`]: the transport seam (tokio or turmoil streams) and the
//!   Redis connector seam.
//! - [`redis_link`]: a self-healing `MultiplexedConnection` over the seam.
//! - [`presence`]: the seed's `online_users` set.
//! - [`registry`]: local connections and the handle used to write to one.
//! - [`session`]: one connection's life.
//! - [`metrics`]: Prometheus metrics the seed's operators watched.
//! - [`testing`]: a throwaway `redis-server` for tests.
//!
//! The server never depends on turmoil; the simulation runs this very code
//! by supplying a turmoil [`Listener`] and [`Connector`].

pub mod config;
pub mod fuzzing;
mod hardened;
pub mod inbox;
pub mod listener;
pub mod metrics;
pub mod presence;
pub mod redis_link;
pub mod registry;
pub mod scripts;
pub mod session;
pub mod testing;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use im_proto::UserId;
use im_proto::pb::ErrorCode;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

pub use config::{Bug, Config, Limits, Profile, Switches};
pub use listener::{Connector, Listener, tcp_connector};
pub use redis_link::RedisLink;

use presence::SeedPresence;
use registry::{Closing, ConnHandle, Registry};

/// State shared by every connection of one server node. One per [`run`]
/// call: nothing is process-global, so a restarted simulated host starts
/// from nothing.
pub struct Shared {
    pub config: Config,
    pub registry: Registry,
    pub redis: RedisLink,
    online_users_key: String,
    connection_slots: Arc<Semaphore>,
    next_conn_id: AtomicU64,
    shutdown: watch::Receiver<bool>,
    /// The hardened profile's state; `None` in the seed's phases.
    hardened: Option<Arc<hardened::Node>>,
}

/// One server node. Build it, keep a clone for observing it (tests), and
/// [`Server::run`] it.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
    stop: Arc<watch::Sender<bool>>,
}

impl Server {
    pub fn new(config: Config, redis: RedisLink) -> Server {
        let (stop, stop_rx) = watch::channel(false);
        let (redis, hardened) = if config.switches().hardened {
            let (redis, pushes) = redis
                .discarding_any_connection(config.has(Bug::SlowRedisRecovery))
                .with_pushes(1024);
            let node = hardened::Node::new((config.clock)(), pushes);
            (redis, Some(Arc::new(node)))
        } else {
            (redis, None)
        };
        let shared = Arc::new(Shared {
            online_users_key: config.online_users_key(),
            connection_slots: Arc::new(Semaphore::new(config.limits.connections_max)),
            next_conn_id: AtomicU64::new(1),
            registry: Registry::default(),
            shutdown: stop_rx,
            hardened,
            redis,
            config,
        });
        Server {
            shared,
            stop: Arc::new(stop),
        }
    }

    /// The node's local connections.
    pub fn registry(&self) -> &Registry {
        &self.shared.registry
    }

    /// Connections currently being served (logged in or not).
    pub fn connections(&self) -> usize {
        self.shared.config.limits.connections_max - self.shared.connection_slots.available_permits()
    }

    /// Accepts connections until `shutdown` resolves, then closes every
    /// connection (hardened: 1012, service restart, "reconnect elsewhere";
    /// the seed's phases: 1001, going away), runs their cleanup and
    /// returns, within `Limits::shutdown_grace` plus one Redis round trip:
    /// connections still open after the grace are dropped, and the leases
    /// they held are released for them.
    pub async fn run<L: Listener>(self, mut listener: L, shutdown: impl Future<Output = ()>) {
        let shared = self.shared;
        tracing::info!(node = %shared.config.node, profile = %shared.config.profile, "server started");
        let pubsub = shared
            .hardened
            .clone()
            .map(|node| tokio::spawn(hardened::pubsub(shared.clone(), node)));
        let mut sessions = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        sessions.spawn(session::serve(shared.clone(), stream, peer.to_string()));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off a bit.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                },
            }
            while sessions.try_join_next().is_some() {}
        }
        while sessions.try_join_next().is_some() {}
        tracing::info!(connections = sessions.len(), "shutting down");
        let _ = self.stop.send(true);
        let grace = shared.config.limits.shutdown_grace;
        if tokio::time::timeout(grace, async {
            while sessions.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            tracing::warn!(
                left = sessions.len(),
                "connections still open after the grace period"
            );
            sessions.shutdown().await;
        }
        if let Some(node) = &shared.hardened {
            hardened::release_leftovers(&shared, node).await;
        }
        if let Some(task) = pubsub {
            task.abort();
        }
        tracing::info!("server stopped");
    }
}

/// Builds a [`Server`] and runs it until `shutdown` resolves.
pub async fn run<L: Listener>(
    listener: L,
    redis: RedisLink,
    config: Config,
    shutdown: impl Future<Output = ()>,
) {
    Server::new(config, redis).run(listener, shutdown).await
}

impl Shared {
    fn presence(&self) -> SeedPresence<'_> {
        SeedPresence {
            redis: &self.redis,
            key: &self.online_users_key,
        }
    }

    /// The seed's `AddWebSocketConnection`: the new connection replaces the
    /// user's map entry, and the user is added to `online_users`.
    async fn add_websocket_connection(&self, handle: ConnHandle) {
        let user = handle.user;
        if let Some(old) = self.registry.insert(handle) {
            tracing::info!(
                old_conn_id = old.conn_id.0,
                "replaced the user's previous connection in the local map"
            );
        }
        match self.presence().add(user).await {
            Ok(()) => tracing::info!("user online: SADD online_users {user}"),
            Err(e) => tracing::error!(error = %e, "SADD online_users {user} failed"),
        }
    }

    /// The seed's `RemoveWebSocketConnection(userID)`, keyed by user id
    /// whatever connection is registered. With `full_cleanup` (phase 3) it
    /// also closes that connection and does `SREM online_users`; without
    /// it (phase 1 and 2) only the local entry goes.
    async fn remove_websocket_connection(&self, user: UserId) {
        let removed = self.registry.remove_user(user);
        if !self.config.switches().full_cleanup {
            tracing::info!(
                user = user.0,
                "local connection deleted; online_users left as it was"
            );
            return;
        }
        if let Some(handle) = removed {
            handle.close(Closing::Drop);
        }
        match self.presence().remove(user).await {
            Ok(()) => tracing::info!(
                user = user.0,
                "connection removed: local map and SREM online_users"
            ),
            Err(e) => tracing::error!(user = user.0, error = %e, "SREM online_users failed"),
        }
    }

    /// The seed's push flow: is the user online in Redis? Is the connection
    /// in the local map? Write the frame. `Ok` is the seed's "sent".
    async fn push(&self, to: UserId, deliver: Message) -> Result<(), (ErrorCode, String)> {
        let offline = |reason: String| (ErrorCode::RecipientOffline, reason);
        let switches = self.config.switches();
        tracing::debug!(to = to.0, "push: checking online_users");
        match self.presence().is_online(to).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(to = to.0, "push: user offline");
                metrics::push("offline");
                return Err(offline(format!("user {to} is offline")));
            }
            Err(e) => {
                tracing::error!(to = to.0, error = %e, "push: presence check failed");
                metrics::push("failed");
                return Err((ErrorCode::Unavailable, format!("presence unavailable: {e}")));
            }
        }
        let Some(conn) = self.registry.get(to) else {
            // The seed trusted online_users "across services": a user online
            // in Redis but not here belongs to another instance. There is no
            // route to it, so the message is gone, yet the sender hears "sent".
            tracing::warn!(
                to = to.0,
                "push: user online in Redis but not in the local map; assuming another service holds it"
            );
            metrics::push("forwarded");
            return Ok(());
        };
        if switches.probe_before_push
            && let Err(e) = conn.write(Message::Ping(Default::default())).await
        {
            tracing::warn!(to = to.0, conn_id = conn.conn_id.0, error = %e, "push: ping probe failed; removing the connection");
            self.remove_websocket_connection(to).await;
            metrics::push("failed");
            return Err(offline(format!("connection to {to} is dead: {e}")));
        }
        match conn.write(deliver).await {
            Ok(()) => {
                tracing::info!(to = to.0, conn_id = conn.conn_id.0, "push: message pushed");
                metrics::push("delivered");
                Ok(())
            }
            Err(e) => {
                tracing::error!(to = to.0, conn_id = conn.conn_id.0, error = %e, "push: write failed");
                if switches.remove_on_push_error {
                    self.remove_websocket_connection(to).await;
                }
                metrics::push("failed");
                Err(offline(format!("push to {to} failed: {e}")))
            }
        }
    }
}
