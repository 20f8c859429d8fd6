//! A seam for the fuzz targets in `fuzz/` (and for tests): serve one
//! already-connected stream on a node exactly as the accept loop does,
//! without a [`Listener`](crate::Listener), and know when it has ended.
//!
//! Nothing here changes behaviour: [`serve`] is the accept loop's
//! per-connection future (handshake, login, read loop, writer, cleanup),
//! [`background`] is the node task [`Server::run`] starts, and [`shutdown`]
//! is what `run` does when its shutdown future resolves.

use std::future::Future;

use crate::listener::Stream;
use crate::{Server, hardened, session};

/// Serves `stream` as if the accept loop had just accepted it from `peer`;
/// returns once the connection has ended and its cleanup has run.
pub async fn serve<S: Stream>(server: &Server, stream: S, peer: &str) {
    session::serve(server.shared.clone(), stream, peer.to_owned()).await
}

/// The node's background work that [`Server::run`] spawns next to its
/// accept loop (the hardened profile's doorbell handler: pub/sub pushes
/// from Redis, resubscription after a redial); `None` when the profile has
/// none. Spawn it, and abort it when done.
pub fn background(server: &Server) -> Option<impl Future<Output = ()> + Send + 'static> {
    let shared = server.shared.clone();
    shared
        .hardened
        .clone()
        .map(|node| hardened::pubsub(shared, node))
}

/// Tells every connection the node is shutting down, as [`Server::run`]
/// does when its shutdown future resolves: each closes with 1001 (phases)
/// or 1012 (hardened) and runs its cleanup.
pub fn shutdown(server: &Server) {
    let _ = server.stop.send(true);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::{SinkExt, StreamExt};
    use im_proto::{Body, msg};
    use tokio_tungstenite::tungstenite::Message;

    use super::*;
    use crate::{Config, Profile, RedisLink};

    /// A Redis that is never there: every dial fails at once.
    fn no_redis() -> crate::Connector {
        std::sync::Arc::new(|| {
            Box::pin(async {
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "no redis in this test",
                ))
            })
        })
    }

    #[tokio::test]
    async fn serves_one_stream_to_its_end() {
        let config = Config::new(Profile::Phase1);
        let timeout = config.limits.redis_timeout;
        let server = Server::new(
            config,
            RedisLink::new(no_redis(), Default::default(), timeout),
        );
        let (client, server_side) = tokio::io::duplex(64 * 1024);
        let session = tokio::spawn({
            let server = server.clone();
            async move { serve(&server, server_side, "test").await }
        });
        let (mut ws, _) = tokio_tungstenite::client_async("ws://node/ws", client)
            .await
            .unwrap();
        ws.send(Message::Binary(im_proto::encode(msg::login(1001))))
            .await
            .unwrap();
        let Some(Ok(Message::Binary(reply))) = ws.next().await else {
            panic!("expected a binary reply");
        };
        assert!(matches!(im_proto::decode(&reply), Ok(Body::LoginOk(_))));
        assert_eq!(server.registry().len(), 1);
        ws.close(None).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), session)
            .await
            .expect("the session ends after the client's close")
            .unwrap();
        assert_eq!(server.registry().len(), 0);
        assert_eq!(server.connections(), 0);
    }
}
