//! A bare WebSocket relay: the baseline `im-client bench` measures the
//! server against. Test equipment, not a server.
//!
//! It speaks the server's framing (one protobuf [`im_proto::pb::Envelope`]
//! per Binary frame, the same tungstenite buffer settings as the server's
//! `Limits`) and nothing more: no Redis, no storage, no heartbeats, no
//! tokens (it trusts `Login.user_id`). A Send becomes a Deliver on the
//! recipient's connection, answered by an accepted SendResult; a recipient
//! that is offline, or whose outbound queue is full, gets the Send
//! rejected. So the relay is the cost of "WebSocket + protobuf + one hop"
//! on this machine, and a server's throughput divided by the relay's says
//! how much its own work costs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use im_proto::pb::{self, ErrorCode};
use im_proto::{Body, msg};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// tungstenite's read buffer per connection; the server's
/// `Limits::read_buffer_bytes` default (`server/src/config.rs`).
pub const READ_BUFFER_BYTES: usize = 1024;
/// Largest inbound frame and message; the server's `Limits` defaults.
pub const FRAME_BYTES_MAX: usize = 64 * 1024;
/// Frames waiting in one connection's outbound queue; the server's
/// `Limits::outbound_queue_max` default.
pub const OUTBOUND_QUEUE_MAX: usize = 256;
/// Concurrent connections; more are dropped right after `accept`. Above
/// the bench's idle-connection cap, so the bench never meets it.
pub const CONNECTIONS_MAX: usize = 25_000;
/// Time allowed for the WebSocket handshake and for one socket write.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A running relay on `127.0.0.1`, on a port of the system's choosing.
/// [`Relay::stop`] ends it; dropping it without `stop` ends it too, but
/// without waiting for its connections.
pub struct Relay {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Where each logged-in user's frames go.
type Routes = Arc<Mutex<HashMap<u64, Route>>>;

struct Route {
    conn: u64,
    queue: mpsc::Sender<Message>,
}

impl Relay {
    /// Binds `127.0.0.1:0` and starts accepting on the current runtime.
    pub async fn start() -> std::io::Result<Relay> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, stop_rx));
        Ok(Relay {
            addr,
            stop,
            task: Some(task),
        })
    }

    /// The relay's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The endpoint, `ws://127.0.0.1:PORT/ws`.
    pub fn url(&self) -> String {
        format!("ws://{}{}", self.addr, im_proto::WS_PATH)
    }

    /// Stops accepting, drops every connection, and waits for that.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
        {
            tracing::warn!(error = %e, "relay accept loop ended abnormally");
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn accept_loop(listener: TcpListener, mut stop: watch::Receiver<bool>) {
    let routes: Routes = Arc::default();
    let next_conn = Arc::new(AtomicU64::new(1));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = super::stopped(&mut stop) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) if conns.len() < CONNECTIONS_MAX => {
                    let conn = next_conn.fetch_add(1, Ordering::Relaxed);
                    conns.spawn(serve(stream, conn, routes.clone()));
                }
                Ok((_stream, peer)) => {
                    tracing::warn!(%peer, max = CONNECTIONS_MAX, "relay: connection limit reached");
                }
                Err(e) => {
                    // Out of file descriptors, most likely: back off a little.
                    tracing::warn!(error = %e, "relay: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
    conns.shutdown().await;
}

/// Rejects handshakes for any path but `/ws`, as the server does.
#[allow(clippy::result_large_err)] // the signature is tungstenite's Callback
fn check_path(req: &Request, resp: Response) -> Result<Response, ErrorResponse> {
    if req.uri().path() == im_proto::WS_PATH {
        Ok(resp)
    } else {
        let mut err = ErrorResponse::new(Some(format!("no endpoint at {}", req.uri().path())));
        *err.status_mut() = StatusCode::NOT_FOUND;
        Err(err)
    }
}

/// The server's tungstenite settings (`server/src/session.rs`).
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_write_buffer_size(FRAME_BYTES_MAX * 4)
        .max_frame_size(Some(FRAME_BYTES_MAX))
        .max_message_size(Some(FRAME_BYTES_MAX))
}

fn frame(body: Body) -> Message {
    Message::Binary(im_proto::encode(body))
}

/// One connection: a read loop here, one writer task owning the write half.
async fn serve(stream: TcpStream, conn: u64, routes: Routes) {
    let _ = stream.set_nodelay(true);
    let handshake =
        tokio_tungstenite::accept_hdr_async_with_config(stream, check_path, Some(ws_config()));
    let ws = match tokio::time::timeout(IO_TIMEOUT, handshake).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "relay: handshake failed");
            return;
        }
        Err(_) => return,
    };
    let (sink, mut stream) = ws.split();
    let (queue, queue_rx) = mpsc::channel(OUTBOUND_QUEUE_MAX);
    let mut writer = tokio::spawn(writer(sink, queue_rx));
    let mut user = None;
    // A JoinHandle must not be polled again once it has returned.
    let mut writer_done = false;
    loop {
        let inbound = tokio::select! {
            biased;
            _ = &mut writer => {
                writer_done = true;
                break;
            }
            inbound = stream.next() => inbound,
        };
        let payload = match inbound {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
            Some(Ok(Message::Binary(payload))) => payload,
            Some(Ok(_)) => continue,
        };
        let reply = match (user, im_proto::decode(&payload)) {
            (None, Ok(Body::Login(login))) if login.user_id != 0 => {
                user = Some(login.user_id);
                let route = Route {
                    conn,
                    queue: queue.clone(),
                };
                lock(&routes).insert(login.user_id, route);
                Body::LoginOk(pb::LoginOk {
                    conn_id: conn,
                    user_id: login.user_id,
                    ..Default::default()
                })
            }
            (Some(from), Ok(Body::Send(send))) => relay_send(&routes, from, send),
            // Heartbeats and acks need nothing here.
            (Some(_), Ok(Body::Heartbeat(_) | Body::Ack(_))) => continue,
            (_, _) => {
                let _ = queue.try_send(frame(msg::error(ErrorCode::Protocol, "unexpected")));
                break;
            }
        };
        if queue.send(frame(reply)).await.is_err() {
            break;
        }
    }
    if let Some(user) = user {
        let mut routes = lock(&routes);
        if routes.get(&user).is_some_and(|r| r.conn == conn) {
            routes.remove(&user);
        }
    }
    // The writer drains what is queued, then closes the socket.
    drop(queue);
    if !writer_done && tokio::time::timeout(IO_TIMEOUT, &mut writer).await.is_err() {
        writer.abort();
    }
}

/// Hands a Deliver to the recipient's queue without waiting; the answer
/// for the sender says whether that worked.
fn relay_send(routes: &Routes, from: u64, send: pb::Send) -> Body {
    let id = send.client_msg_id;
    let Some(target) = lock(routes).get(&send.to_user_id).map(|r| r.queue.clone()) else {
        return msg::rejected(id, ErrorCode::RecipientOffline, "recipient offline");
    };
    let deliver = Body::Deliver(pb::Deliver {
        from_user_id: from,
        text: send.text,
        client_msg_id: id,
        seq: 0,
    });
    match target.try_send(frame(deliver)) {
        Ok(()) => msg::accepted(id, 0),
        Err(mpsc::error::TrySendError::Full(_)) => {
            msg::rejected(id, ErrorCode::Limit, "recipient queue full")
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            msg::rejected(id, ErrorCode::RecipientOffline, "recipient offline")
        }
    }
}

fn lock(routes: &Routes) -> std::sync::MutexGuard<'_, HashMap<u64, Route>> {
    routes.lock().unwrap_or_else(|e| e.into_inner())
}

/// The only task that writes to the socket: one frame at a time, each
/// flushed (as the server's writer does), then a close frame at the end.
async fn writer(
    mut sink: futures_util::stream::SplitSink<WebSocketStream<TcpStream>, Message>,
    mut queue: mpsc::Receiver<Message>,
) {
    while let Some(message) = queue.recv().await {
        match tokio::time::timeout(IO_TIMEOUT, sink.send(message)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
    let _ = tokio::time::timeout(IO_TIMEOUT, sink.close()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Client, Event, Options};
    use im_proto::UserId;

    async fn next(client: &mut Client) -> Event {
        tokio::time::timeout(Duration::from_secs(5), client.next_event())
            .await
            .expect("an event within 5 s")
            .expect("the client is running")
    }

    #[tokio::test]
    async fn relays_a_send_and_rejects_an_offline_recipient() {
        let relay = Relay::start().await.unwrap();
        let mut a = Client::connect(Options::new(UserId(1), relay.url()))
            .await
            .unwrap();
        let mut b = Client::connect(Options::new(UserId(2), relay.url()))
            .await
            .unwrap();
        a.send(UserId(2), "hi", 7).await.unwrap();
        assert_eq!(
            next(&mut b).await,
            Event::Delivered {
                from: UserId(1),
                text: "hi".into(),
                client_msg_id: 7,
                seq: 0
            }
        );
        assert!(matches!(
            next(&mut a).await,
            Event::SendResult {
                client_msg_id: 7,
                accepted: true,
                ..
            }
        ));
        a.send(UserId(3), "anyone?", 8).await.unwrap();
        assert!(matches!(
            next(&mut a).await,
            Event::SendResult {
                client_msg_id: 8,
                accepted: false,
                ..
            }
        ));
        a.close().await.unwrap();
        assert!(matches!(next(&mut a).await, Event::Closed(_)));
        relay.stop().await;
    }
}
